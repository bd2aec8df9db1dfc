#!/usr/bin/env bash
# Runs every test of the project against the real local stack:
#   1. brings the stack up (deploy/local/stack up: installs what is missing),
#   2. applies topics and registers schemas,
#   3. cargo fmt --check, cargo clippy -D warnings, ruff check (Python), cargo deny,
#   4. cargo test --workspace (unit, property and integration tests),
#   5. pytest for the training job (training/tests, against the real MLflow) and
#      the Helm chart (deploy/helm/tests: helm lint and template, from scripts/helm.sh, and the
#      strict Kubernetes-types check) and the CI workflow (scripts/tests: actionlint, shellcheck),
# and ends with one "N passed, N failed" line counting both.
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

step "ruff check (Python)"
"$(dirname "$LEADSCORE_PYTHON")/ruff" check training deploy scripts

step "cargo deny (licenses, duplicate versions, sources)"
deny="${LEADSCORE_CACHE:-$HOME/.cache/leadscore}/cargo-deny-0.20.2/bin/cargo-deny"
if [[ ! -x "$deny" ]]; then
  cargo install cargo-deny --version 0.20.2 --locked --root "$(dirname "$(dirname "$deny")")"
fi
"$deny" check bans licenses sources

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

step "pytest (training/, the Helm chart)"
export LEADSCORE_BIN
LEADSCORE_BIN="$(leadscore_bin)"
set +e
export LEADSCORE_HELM
LEADSCORE_HELM="$(scripts/helm.sh)"
(cd training && "$LEADSCORE_PYTHON" -m pytest -q -p no:cacheprovider tests ../deploy/helm/tests ../scripts/tests) 2>&1 | tee "$log"
py_status=${PIPESTATUS[0]}
set -e
read -r py_passed py_failed < <(tail -n 3 "$log" | awk '{
    for (i = 2; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^(failed|errors?)/) f += $(i-1) }
  } END { print p + 0, f + 0 }')
rm -f "$log"
if [[ $py_status -ne 0 && $py_failed -eq 0 ]]; then py_failed=1; fi
echo
echo "$((passed + py_passed)) passed, $((failed + py_failed)) failed"
if [[ $status -ne 0 || $py_status -ne 0 ]]; then exit 1; fi
