#!/usr/bin/env bash
# Prepares the browser tests: Debian's chromium and chromium-driver (apt-get, when missing) and
# a Python virtual environment with selenium under target/browser-venv (when missing).
# Run as root or with sudo available for apt-get. Takes about a minute the first time.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    echo "browser tests: installing chromium and chromium-driver with apt-get"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

VENV=target/browser-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import selenium' 2>/dev/null; then
    echo "browser tests: creating $VENV with selenium"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/browser/requirements.txt
fi
echo "browser tests: chromium $(chromium --version 2>/dev/null | awk '{print $2}'), $("$VENV/bin/python" -c 'import selenium; print("selenium", selenium.__version__)')"
