#!/usr/bin/env bash
# Runs every test of the project against the real local stack:
#   1. brings the stack up (deploy/local/stack up: installs what is missing),
#   2. applies topics and registers schemas,
#   3. cargo fmt --check, cargo clippy -D warnings,
#   4. cargo test --workspace (unit, property and integration tests),
# and ends with one "N passed, N failed" line.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

step "stack up"
deploy/local/stack up
eval "$(deploy/local/stack env)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build"
cargo build --workspace --all-targets --locked

step "topics and schemas"
"$(leadscore_bin)" topics apply
"$(leadscore_bin)" schemas register

step "cargo test"
log="$(mktemp)"
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) }
  } END { print p + 0, f + 0 }' "$log")
rm -f "$log"
echo
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$status"
