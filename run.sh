#!/usr/bin/env bash
# Entry point for operators and newcomers. Each command sets up .venv/ from
# requirements.cpu.txt when it is missing or the requirements changed.
#
#   ./run.sh demo [--dims tiny|official] [--model-dir DIR]   synthesize demo.wav
#   ./run.sh test [pytest args]                               lint + default test suite
#   ./run.sh verify MODEL_DIR GOLDEN_PT [--json] [--strict]   golden parity checker
#   ./run.sh bench [--seconds 10,30] [--modes ...] [--repeat N]  streaming benchmark
#   ./run.sh python ...                                       python inside the venv
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_venv() {
  local want have=""
  want="$(sha256sum "$ROOT/requirements.cpu.txt" | cut -d' ' -f1)"
  [ -f "$VENV/.requirements.sha256" ] && have="$(cat "$VENV/.requirements.sha256")"
  if [ ! -x "$VENV/bin/python" ] || [ "$want" != "$have" ]; then
    echo "run.sh: setting up $VENV from requirements.cpu.txt" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.cpu.txt" >&2
    echo "$want" > "$VENV/.requirements.sha256"
  fi
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_venv
    cd "$ROOT" && exec "$VENV/bin/python" -m worker.demo --out "${OLDPWD:-$PWD}/demo.wav" "$@"
    ;;
  test)
    ensure_venv
    cd "$ROOT"
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  verify)
    ensure_venv
    exec "$VENV/bin/python" -m worker.verify "$@"
    ;;
  bench)
    ensure_venv
    cd "$ROOT" && exec "$VENV/bin/python" -m tuning.bench "$@"
    ;;
  python)
    ensure_venv
    exec "$VENV/bin/python" "$@"
    ;;
  setup)
    ensure_venv
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
