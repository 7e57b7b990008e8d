#!/usr/bin/env bash
# Entry point for operators and newcomers. Each command sets up .venv/ from
# requirements.cpu.txt when it is missing or the requirements changed. Relative paths are
# relative to the directory you run it from; demo.wav is written there too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

usage() {
  cat <<'EOF'
usage: ./run.sh COMMAND [ARGS]

  serve [--model-dir DIR] [--bind ADDR]        run the worker service (default model dir:
                                               COSY_MODEL_DIR; COSY_CPUS: the whole worker
                                               under taskset -c; other COSY_* knobs apply)
  demo [--model-dir DIR] [--dims tiny|official] [--text T] [--seconds S]
                                               synthesize ./demo.wav through the service
                                               (default: a random-weight model: noise)
  profile [--seconds S] [--out DIR] [--model-dir DIR] [--dims tiny|official]
                                               py-spy flamegraphs + top functions of the
                                               server and every stage under a fixed workload
                                               (default out: .cache/profiles/<time>/)
  test [pytest args]                           ruff + the default test suite (what CI runs)
  verify MODEL_DIR GOLDEN_PT [--json] [--strict] [--tol T]
                                               golden parity checker
  bench [--model-dir DIR] [--seconds 10,30] [--modes ...] [--repeat N] [...]
                                               streaming benchmark
  python ARGS                                  python inside the venv
  setup                                        create / refresh .venv only
  help                                         this text
EOF
}

die() {  # one line, exit 2
  echo "run.sh $cmd: $*" >&2
  exit 2
}

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

# `python -m MODULE ARGS` without cd-ing into the repo (relative paths stay the caller's): the
# repo replaces the current directory on sys.path, and argparse usage errors are one line.
BOOT='import argparse, runpy, sys; sys.path[0] = sys.argv[1]; argparse.ArgumentParser.error = lambda self, m: self.exit(2, f"{self.prog}: error: {m} (see --help)\n"); sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)'

run_module() {  # run_module MODULE ARGS... (exec: signals reach python directly)
  exec "$VENV/bin/python" -c "$BOOT" "$ROOT" "$@"
}

# Checks before a long start: bad input is one line on stderr and exit status 2.
#   preflight knobs                  COSY_* through Knobs.from_env() (and inside COSY_CPUS)
#   preflight model-dir DIR service  a model dir the service can run (yaml, weights, encoders)
#   preflight model-dir DIR config   a model dir whose config reads
#   preflight seconds LIST           comma-separated numbers > 0
preflight() {
  "$VENV/bin/python" - "$ROOT" "$cmd" "$@" <<'PY' || exit 2
import sys

root, cmd, what, *args = sys.argv[1:]
sys.path[0] = root
from worker.demo import SERVICE_FILES, InputError, check_knobs, check_model_dir

try:
    if what == "knobs":
        check_knobs()
    elif what == "model-dir":
        check_model_dir(args[0], need=SERVICE_FILES if args[1] == "service" else ())
    elif what == "seconds":
        for s in args[0].split(","):
            try:
                ok = float(s) > 0
            except ValueError:
                ok = False
            if not ok:
                raise InputError(f"--seconds {s}: must be a number > 0")
except InputError as e:
    print(f"run.sh {cmd}: {e}", file=sys.stderr)
    sys.exit(2)
PY
}

has_help() {
  local a
  for a in "$@"; do
    case "$a" in -h|--help) return 0 ;; esac
  done
  return 1
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    ensure_venv
    model_dir="${COSY_MODEL_DIR:-}" have_dir="${COSY_MODEL_DIR+x}" args=("$@")
    while [ $# -gt 0 ]; do
      case "$1" in
        --model-dir) [ $# -ge 2 ] || die "--model-dir needs a value"; model_dir="$2"; have_dir=x; shift 2 ;;
        --model-dir=*) model_dir="${1#*=}"; have_dir=x; shift ;;
        *) shift ;;
      esac
    done
    if ! has_help ${args[@]+"${args[@]}"}; then
      [ -n "$have_dir" ] || die "no model dir: pass --model-dir DIR or set COSY_MODEL_DIR"
      preflight knobs
      preflight model-dir "$model_dir" service
    fi
    if [ -n "${COSY_CPUS:-}" ]; then  # validated by the knobs above
      command -v taskset >/dev/null || die "COSY_CPUS is set but taskset is not installed (util-linux)"
      exec taskset -c "$COSY_CPUS" "$VENV/bin/python" -c "$BOOT" "$ROOT" worker.server ${args[@]+"${args[@]}"}
    fi
    run_module worker.server ${args[@]+"${args[@]}"}
    ;;
  demo)
    ensure_venv
    run_module worker.demo "$@"
    ;;
  profile)
    ensure_venv
    run_module tuning.profile "$@"
    ;;
  test)
    ensure_venv
    cd "$ROOT"
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  verify)
    ensure_venv
    if [ $# -ge 1 ] && [ "${1#-}" = "$1" ] && ! has_help "$@"; then
      preflight model-dir "$1" config
    fi
    run_module worker.verify "$@"
    ;;
  bench)
    ensure_venv
    if ! has_help "$@"; then
      args=("$@")
      while [ $# -gt 0 ]; do
        case "$1" in
          --model-dir) [ $# -ge 2 ] || die "--model-dir needs a value"; preflight model-dir "$2" config; shift 2 ;;
          --model-dir=*) preflight model-dir "${1#*=}" config; shift ;;
          --seconds) [ $# -ge 2 ] || die "--seconds needs a value"; preflight seconds "$2"; shift 2 ;;
          --seconds=*) preflight seconds "${1#*=}"; shift ;;
          *) shift ;;
        esac
      done
      set -- ${args[@]+"${args[@]}"}
    fi
    run_module tuning.bench "$@"
    ;;
  python)
    ensure_venv
    exec "$VENV/bin/python" "$@"
    ;;
  setup)
    ensure_venv
    ;;
  help|-h|--help)
    usage
    ;;
  *)
    echo "run.sh: unknown command '$cmd' (commands: serve, demo, profile, test, verify, bench," \
      "python, setup, help: ./run.sh help)" >&2
    exit 2
    ;;
esac
