"""A real SMTP server for the alert-routing test.

Accepts every message on 127.0.0.1:PORT and appends it to OUT as one JSON
line ({"from", "to", "data"}). Python 3.11's standard-library smtpd; no
packages to install.

usage: python3 smtp_sink.py PORT OUT
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import asyncore  # noqa: E402
import smtpd  # noqa: E402

PORT = int(sys.argv[1])
OUT = sys.argv[2]


class Sink(smtpd.SMTPServer):
    def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(json.dumps({"from": mailfrom, "to": rcpttos, "data": data}) + "\n")


Sink(("127.0.0.1", PORT), None, decode_data=False)
print("smtp sink listening", flush=True)
asyncore.loop()
