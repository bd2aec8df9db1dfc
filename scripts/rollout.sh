#!/usr/bin/env bash
# Rolls a new model version out through the lifecycle controller and waits for the outcome:
#   scripts/rollout.sh MODEL REASON [TIMEOUT_SECS]
# asks for a retrain (`leadscore retrain request`: the training worker trains, gates and
# registers the candidate in MLflow), then follows `leadscore model status` while the
# controller runs it through shadow -> canary 10/50/100 -> champion. Exits 0 once the
# candidate is champion; 1 when the controller rolled it back, or no candidate appeared
# (the training gate rejected it); a candidate still under way at the timeout is rolled
# back (`leadscore model rollback`), exit 1.
# LEADSCORE_CLI is the command that runs the CLI against the cluster, e.g.
# "kubectl -n leadscore exec deploy/leadscore-controller -- leadscore" (default: leadscore).
set -euo pipefail
model="${1:?usage: rollout.sh MODEL REASON [TIMEOUT_SECS]}"
reason="${2:?usage: rollout.sh MODEL REASON [TIMEOUT_SECS]}"
timeout="${3:-7200}"
poll="${ROLLOUT_POLL_SECS:-30}"
read -r -a cli <<<"${LEADSCORE_CLI:-leadscore}"
by="${ROLLOUT_BY:-ci}"

# The model's row of `leadscore model status`: champion phase candidate canary%.
status_row() {
  "${cli[@]}" model status | awk -v m="$model" '$1 == m { print $2, $3, $4, $5 }'
}

read -r before _ _ _ <<<"$(status_row || true)"
echo "rollout of $model: champion before is ${before:--}"
"${cli[@]}" retrain request --model "$model" --reason "$reason" --by "$by"

deadline=$((SECONDS + timeout))
candidate=""
last=""
while ((SECONDS < deadline)); do
  read -r champion phase cand percent <<<"$(status_row || true)"
  now="${champion:--} ${phase:--} ${cand:--} ${percent:-0}"
  if [[ "$now" != "$last" ]]; then
    echo "$(date -u +%FT%TZ) champion=${champion:--} phase=${phase:--} candidate=${cand:--} canary=${percent:-0}%"
    last="$now"
  fi
  if [[ -n "${cand:-}" && "$cand" != "-" ]]; then
    candidate="$cand"
  fi
  if [[ "${phase:-}" == "steady" && -n "$candidate" ]]; then
    if [[ "${champion:-}" == "$candidate" ]]; then
      echo "rollout of $model: version $candidate is champion"
      exit 0
    fi
    echo "rollout of $model: candidate $candidate was rolled back; champion stays ${champion:--}" >&2
    exit 1
  fi
  sleep "$poll"
done
if [[ -z "$candidate" ]]; then
  # Nothing under way: a rollback now would undo the last promotion instead.
  echo "rollout of $model: no candidate in ${timeout}s (did the training gate reject it? see the retrain request's lifecycle events)" >&2
  exit 1
fi
echo "rollout of $model: candidate $candidate has no outcome in ${timeout}s; rolling it back" >&2
"${cli[@]}" model rollback --model "$model" --by "$by" || true
exit 1
