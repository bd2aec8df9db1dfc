# shellcheck shell=bash
# Shared by scripts/*.sh. Finds cargo, picks the target dir, prints steps.

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

step() { printf '\n==> %s\n' "$*"; }

# The workspace's cargo target directory.
target_dir() {
  cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}

leadscore_bin() {
  echo "$(target_dir)/debug/leadscore"
}

leadscore_release_bin() {
  echo "$(target_dir)/release/leadscore"
}
