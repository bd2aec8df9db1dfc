#!/usr/bin/env bash
# The main job: brings the whole stack up on this machine, creates the
# topics and registers the schemas, and shows the state of each.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

step "bringing the stack up (first run installs Kafka, Connect, Debezium, Apicurio, Postgres, Redis, MLflow)"
deploy/local/stack up
eval "$(deploy/local/stack env)"

step "building leadscore"
cargo build --locked -p leadscore
bin="$(leadscore_bin)"

step "topics (topics/topics.yaml)"
"$bin" topics apply
echo
"$bin" topics list

step "schemas (schemas/*.avsc, BACKWARD compatibility)"
"$bin" schemas register

step "stack"
deploy/local/stack status
echo
echo "Kafka Connect plugins:"
curl -fsS "$LEADSCORE_CONNECT_URL/connector-plugins" | python3 -c '
import json, sys
for p in json.load(sys.stdin):
    print("  %-7s %s %s" % (p["type"], p["class"], p["version"]))'
echo
echo "CRM tables: $(PGPASSWORD=leadscore psql -h 127.0.0.1 -U leadscore -d crm -Atc "select string_agg(tablename, ', ') from pg_tables where schemaname = 'public'")"
echo
echo "Done. Logs: .stack/logs/   Stop everything: deploy/local/stack down"
