#!/usr/bin/env bash
# Rebuilds the bundled default model in models/default from scratch,
# reproducibly: same generator seed, same Optuna seed, deterministic LightGBM.
#   make model
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

deploy/local/stack install
eval "$(deploy/local/stack env)"
cargo build --locked -p leadscore
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step "generating 60,000 synthetic leads (seed 42)"
"$(leadscore_bin)" crm seed --count 60000 --seed 42 --out "$work/leads.csv"

step "training (30 Optuna trials, time-series CV)"
(cd training && "$LEADSCORE_PYTHON" -m leadscore_training.train --data "$work/leads.csv" \
  --out "$REPO/models/default" --trials 30 --seed 42 --version bundled-1 --reproducible --no-mlflow)

step "shared test vectors"
(cd training && "$LEADSCORE_PYTHON" -m leadscore_training.parity --model "$REPO/models/default" --data "$work/leads.csv")
ls -la "$REPO/models/default"
