#!/usr/bin/env bash
# Everything the project needs on a fresh Debian machine: espeak-ng + sox (apt),
# .venv/ with the pinned wheels, this package (editable) and its s3prl registration.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing espeak-ng and sox with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24"
echo "[setup] installing pinned wheels (requirements.lock); the first time takes a few minutes"
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/s3prl-ekd register
echo "[setup] done: .venv/bin/s3prl-ekd is ready"
