#!/usr/bin/env bash
# System packages the local stack needs that PyPI does not carry: a real redis-server.
set -euo pipefail
if command -v redis-server >/dev/null; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system-wide instance; the project runs its own on free ports.
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
redis-server --version
