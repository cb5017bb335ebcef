# Sourced by scripts/run and scripts/test: make .venv with a supported Python
# (3.10 to 3.13; trio-asyncio does not import on 3.14) and install trio-chat into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRIO_CHAT_VENV:-$ROOT/.venv}"

find_python() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "trio-chat needs Python 3.10 to 3.13; none found on PATH" >&2
  return 1
}

# The venv remembers what it was installed from (pyproject.toml's hash and the extras)
# in this file: while they are unchanged nothing is installed again, so a start needs
# neither pip nor the package index. The install is editable: code changes need none.
STAMP="$VENV/.trio-chat-installed"

ensure_venv() {  # $1: pip extras, e.g. "[test]" or ""
  local hash log
  hash="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/trio-chat" ] && [ -f "$STAMP" ] &&
     { [ "$(cat "$STAMP")" = "$hash $1" ] || { [ -z "$1" ] && [ "$(cut -d' ' -f1 "$STAMP")" = "$hash" ]; }; }; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
  fi
  log="$(mktemp)"
  if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip &&
         "$VENV/bin/python" -m pip install --quiet -e "$ROOT$1"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
  echo "$hash $1" >"$STAMP"
}
