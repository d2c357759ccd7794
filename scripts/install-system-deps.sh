#!/usr/bin/env bash
# System packages the local stack and the tests need that PyPI does not carry: a real
# redis-server, a real Prometheus server with promtool (the metrics tests scrape with it), and
# Debian's Chromium (the usage page is rendered by a real headless browser in the tests).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages start system-wide instances; the project runs its own on free ports.
for svc in redis-server prometheus; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
redis-server --version
prometheus --version 2>&1 | head -1
chromium --version
