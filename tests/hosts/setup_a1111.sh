#!/usr/bin/env bash
# Prepare a real AUTOMATIC1111 1.10.1 for the real-host tests, offline except for the package index:
# unpack ../shared/hosts/a1111-v1.10.1.tar.gz into the cache folder, make its own venv with
# A1111's pinned requirements (torch 2.13.0 CPU, torchvision 0.28.0 patched for CPU), install
# openai CLIP from the shipped tree and write the offline Hugging Face cache A1111's SD1.5 needs.
# Idempotent: a finished step leaves a marker and is skipped next time.
# Usage: bash tests/hosts/setup_a1111.sh [SHARED_HOSTS_DIR] [CACHE_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="${1:-${DS_SHARED_HOSTS:-$here/../../../shared/hosts}}"
# not under a dot-folder (~/.cache): gradio 3.41 refuses to serve files from one (its /file= route
# answers 403 for the WebUI's own style.css and script.js there)
cache="${2:-${DS_HOSTS_CACHE:-/var/tmp/sd-webui-delta-sampling/hosts}}"
shared="$(cd "$shared" && pwd)"
mkdir -p "$cache"
root="$cache/a1111"
venv="$cache/a1111-venv"
py="$venv/bin/python"
log="$cache/setup.log"
# shellcheck source=setup_lib.sh
. "$here/setup_lib.sh"
pip_install() { pip_install_with "$py" "$log" "$@"; }

if [ ! -f "$root/.unpacked" ]; then
    rm -rf "$root" "$cache/stable-diffusion-webui"
    tar -xzf "$shared/a1111-v1.10.1.tar.gz" -C "$cache"
    mv "$cache/stable-diffusion-webui" "$root"
    tar -xzf "$shared/openai-clip-d50d76da.tar.gz" -C "$root"
    touch "$root/.unpacked"
fi

if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # torch==2.13.0 is the CPU build on these machines (torchvision 0.28.0 is its pair, patched below);
    # the rest at A1111's own pins, except setuptools: >=77.0.3,<81 as ../shared/hosts/README.md's
    # known-good recipe (<81 keeps pkg_resources, which pytorch_lightning imports).
    printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$venv/constraints.txt"
    grep -v -E '^(torch|setuptools)\b' "$root/requirements_versions.txt" > "$venv/requirements.txt"
    pip_install -c "$venv/constraints.txt" torch==2.13.0 torchvision==0.28.0 "setuptools>=77.0.3,<81" wheel
    pip_install -c "$venv/constraints.txt" -r "$venv/requirements.txt"
    "$py" "$shared/patch_torchvision_cpu.py" >/dev/null
    pip_install --no-build-isolation --no-deps "$root/CLIP"
    pip_install -c "$venv/constraints.txt" ftfy regex tqdm
    touch "$venv/.installed"
fi

if [ ! -f "$cache/hf/.made" ]; then
    "$py" "$shared/make_clip_cache.py" "$cache/hf" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    touch "$cache/hf/.made"
fi
echo "$root"
