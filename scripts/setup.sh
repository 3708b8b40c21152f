#!/usr/bin/env bash
# Everything the project needs on a fresh Debian machine: espeak-ng + sox (apt), a venv with the
# pinned wheels of one stack, this package (editable) and its s3prl.hub start-up hook.
#   scripts/setup.sh            .venv/          requirements.lock          s3prl 0.4.18, torch 2.8
#   scripts/setup.sh current    .venv-current/  requirements-current.lock  espnet-s3prl, torch 2.11
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-default}" in
    default) VENV=.venv; LOCK=requirements.lock ;;
    current) VENV=.venv-current; LOCK=requirements-current.lock ;;
    *) echo "usage: scripts/setup.sh [default|current]" >&2; exit 2 ;;
esac

if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing espeak-ng and sox with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
echo "[setup] installing pinned wheels ($LOCK) into $VENV; the first time takes a few minutes"
"$VENV/bin/python" -m pip install -q -r "$LOCK"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/s3prl-ekd" register
echo "[setup] done: $VENV/bin/s3prl-ekd is ready"
