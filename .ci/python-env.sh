#!/usr/bin/env bash
# Python peers for the interoperability tests (tests/interop/*.py).
#
# Creates (or reuses) one venv, <repo>/.venv, holding exactly nameko==2.14.1 and
# micro-framework==2.1.1 (PyPI) plus every transitive dependency pinned to a set
# verified on CPython 3.11 against RabbitMQ 3.10 (events both ways, RPC, errors).
# The two packages do not conflict (both need kombu>=5.2 on 3.10+), so one venv
# serves both peers.
#
# Idempotent and fast: when the venv exists and every pin is installed it only
# prints the interpreter path. Otherwise it (re)creates the venv from PyPI.
#
# Stdout: the venv's python path, alone on the last line (progress goes to
# stderr), so   PY="$(bash .ci/python-env.sh | tail -n1)"   works.
# Env: PYTHON=interpreter to build the venv with (default python3.11, else
#      python3 when it is 3.11); MF_INTEROP_VENV=path overrides <repo>/.venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MF_INTEROP_VENV:-$ROOT/.venv}"

# Pins. The two packages under test, then everything else they pull in.
#
# eventlet==0.33.3: nameko 2.14.1 requires eventlet>=0.33.0 on Python >= 3.10
#   (0.33 is the first line with 3.10+/3.11 support). 0.33.3 is the last
#   release before the 0.34 rework of green locks/queues, which broke nameko
#   services at start-up ("'Queue' object has no attribute 'mutex'",
#   nameko/nameko#783, with the kombu of that time); 0.35+ also print a
#   deprecation warning on import. eventlet 0.33.x does not work on
#   Python 3.12 (ssl.wrap_socket is gone), hence the venv is 3.11.
#   (The newest eventlet, 0.41.3 with kombu 5.7.0, was also seen to work here,
#   but 0.33.3 is the version nameko 2.14.1 was released against.)
# greenlet 3.x, dnspython 2.x: what pip resolves for eventlet 0.33.3 on 3.11;
#   verified working (no dnspython<2 cap is needed on 3.10+).
# kombu 5.7.0 / amqp 5.4.2 / vine 5.1.0: satisfy nameko (kombu>=5.2.0 on 3.10+)
#   and micro-framework (kombu>=4.6.8,<6).
# websockets 8.1, websocket-client 0.59.0, prometheus-client 0.8.0, loky 2.9.0:
#   micro-framework's upper caps (<9, <1, <0.9, <3). websockets 8.1 has no
#   cp311 wheel: pip builds it from the sdist (its C speed-up is optional).
# Werkzeug 3.x: only nameko's HTTP entrypoint imports it; unused by the peers.
PINS=(
  "nameko==2.14.1"
  "micro-framework==2.1.1"
  "eventlet==0.33.3"
  "greenlet==3.5.6"
  "dnspython==2.9.2"
  "kombu==5.7.0"
  "amqp==5.4.2"
  "vine==5.1.0"
  "mock==5.2.0"
  "path.py==12.5.0"
  "path==17.1.1"
  "PyYAML==6.0.4"
  "requests==2.34.2"
  "urllib3==2.8.0"
  "idna==3.20"
  "charset-normalizer==3.5.3"
  "certifi==2026.10.19.post1"
  "six==1.17.0"
  "Werkzeug==3.1.9"
  "MarkupSafe==3.0.4"
  "wrapt==2.5.2"
  "packaging==26.4"
  "websockets==8.1"
  "websocket-client==0.59.0"
  "prometheus-client==0.8.0"
  "loky==2.9.0"
  "cloudpickle==3.1.3"
  "psutil==7.2.2"
)

log() { echo "python-env: $*" >&2; }

# True when $1 (a python) has every pin installed and both packages import.
venv_ok() {
  local py="$1"
  [ -x "$py" ] || return 1
  "$py" - "${PINS[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
if sys.version_info[:2] != (3, 11):
    sys.exit(1)
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}

smoke_test() {
  "$1" -W ignore - <<'EOF'
import eventlet
eventlet.monkey_patch()
import nameko.containers, nameko.events, nameko.rpc, nameko.standalone.rpc  # noqa
import nameko.testing.services  # noqa
import micro_framework.runner, micro_framework.amqp.entrypoints  # noqa
import micro_framework.amqp.dependencies  # noqa
EOF
}

PY_VENV="$VENV/bin/python"
if venv_ok "$PY_VENV"; then
  echo "$PY_VENV"
  exit 0
fi

# Serialise concurrent builders (parallel test binaries, CI steps).
LOCK="${TMPDIR:-/tmp}/mf-python-env.$(echo "$VENV" | cksum | cut -d' ' -f1).lock"
exec 9>"$LOCK"
flock 9
if venv_ok "$PY_VENV"; then # built by whoever held the lock
  echo "$PY_VENV"
  exit 0
fi

BASE="${PYTHON:-}"
if [ -z "$BASE" ]; then
  if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'pass' >/dev/null 2>&1; then
    BASE=python3.11
  elif command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    BASE=python3
  else
    log "no Python 3.11 found (set PYTHON=/path/to/python3.11)"
    exit 1
  fi
fi
log "building $VENV with $($BASE --version 2>&1)"
"$BASE" -m venv --clear "$VENV"
"$PY_VENV" -m pip install --disable-pip-version-check --no-input -q "${PINS[@]}" >&2
smoke_test "$PY_VENV" >&2
venv_ok "$PY_VENV" || {
  log "venv built but pins do not match"
  exit 1
}
log "ready"
echo "$PY_VENV"
