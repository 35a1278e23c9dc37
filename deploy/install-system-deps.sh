#!/usr/bin/env bash
# Install Debian's prometheus (server + promtool), prometheus-alertmanager and chromium
# (the report's headless-browser test) when they are missing. Only root can; anyone else
# gets a message and the tests that need the binaries skip with the same advice.
set -u
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
  || missing+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${missing[*]} not installed; the tests that need them will skip." >&2
  echo "      install with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Do not let the packages' init scripts start system-wide daemons: tests start their own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
rc=$?
[ "$created_policy" = 1 ] && rm -f "$policy"
exit $rc
