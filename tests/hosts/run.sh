#!/usr/bin/env bash
# The real-host suite: real AUTOMATIC1111 1.10.1, Forge and Forge Neo from ../shared/hosts (or
# $DS_SHARED_HOSTS), on CPU, offline, driven over HTTP and in headless Chromium. Prepares everything
# it needs (cached under /var/tmp/sd-webui-delta-sampling/hosts, or $DS_HOSTS_CACHE; each host's tree
# and venv when its first test starts), then runs pytest on tests/hosts.
# Usage: bash tests/hosts/run.sh [pytest args]      (with the test venv active, as for tests/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "the browser tests need Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2
    fi
fi
log="$(mktemp)"  # pip's output only when it fails (this machine's pip config warns on every package)
python -m pip install -q -r tests/hosts/requirements.txt >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
bash tests/hosts/setup_a1111.sh >/dev/null
DS_REAL_HOSTS=1 python -m pytest tests/hosts -p no:cacheprovider "$@"
