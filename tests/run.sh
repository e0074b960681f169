#!/usr/bin/env bash
# Installs everything the tests need (Python packages, and Debian packages for the browser and window tests when
# run as root) and runs the whole suite. README's second command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS="chromium xvfb xdotool x11-utils libglib2.0-bin gsettings-desktop-schemas binutils"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "Installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
python3 -m pip install -q -r requirements-test.txt
python3 -m pytest -q "$@"
