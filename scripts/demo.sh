#!/usr/bin/env bash
# The main job: brings the whole stack up on this machine, creates the
# topics, registers the schemas, applies the connectors, then runs the CRM
# round trip live: synthetic leads inserted into the CRM's Postgres come
# back as score rows in the CRM's Postgres. Extra arguments go to
# `leadscore demo` (e.g. --leads 10000 --rate 500).
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

step "the CRM round trip: Postgres -> Debezium -> Kafka -> scorer -> Kafka -> JDBC sink -> Postgres"
"$bin" demo "$@"
echo
echo "Logs: .stack/logs/   Connectors: $bin connectors status   Stop everything: deploy/local/stack down"
