"""Fixtures: leads from the project's own generator (`leadscore crm seed`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))


def leadscore_bin() -> str:
    path = os.environ.get("LEADSCORE_BIN")
    if not path or not Path(path).is_file():
        raise RuntimeError("set LEADSCORE_BIN to the built leadscore binary (scripts/test.sh does)")
    return path


@pytest.fixture(scope="session")
def leads_csv(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "leads.csv"
    subprocess.run([leadscore_bin(), "crm", "seed", "--count", "16000", "--seed", "5", "--out", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def mlflow_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError("MLFLOW_TRACKING_URI is not set: run `eval \"$(deploy/local/stack env)\"`")
    return uri
