#!/usr/bin/env bash
# Prepare a real reForge (Panchovix/stable-diffusion-webui-reForge, `ldm_patched` backend, gradio 3.41)
# for the real-host tests. Its tree is not among ../shared/hosts: point DS_REFORGE_TREE at a checkout,
# e.g. from a fetched mirror: git -C MIRROR archive 3b56b268 | tar -x -C DIR (main, 2026-03-11; a
# mirror lacking the HunyuanVideo llama_tokenizer/tokenizer.json blob needs
# -- . ':(exclude)ldm_patched/modules/text_encoders/llama_tokenizer/tokenizer.json').
# The A1111 recipe (setup_a1111.sh: torch 2.13.0 CPU, patched torchvision 0.28.0, setuptools <81)
# plus pydantic==1.10.15 and openai-clip from the index; repositories/ (which reForge's launcher would
# git-clone: the same pins as A1111 1.10.1) copied from the A1111 tree when the checkout has none.
# Idempotent: a finished step leaves a marker and is skipped next time.
# Usage: DS_REFORGE_TREE=DIR bash tests/hosts/setup_reforge.sh [SHARED_HOSTS_DIR] [CACHE_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="${1:-${DS_SHARED_HOSTS:-$here/../../../shared/hosts}}"
cache="${2:-${DS_HOSTS_CACHE:-/var/tmp/sd-webui-delta-sampling/hosts}}"
root="$(cd "${DS_REFORGE_TREE:?set DS_REFORGE_TREE to a reForge checkout}" && pwd)"
venv="$cache/reforge-venv"
py="$venv/bin/python"
log="$cache/setup-reforge.log"
# shellcheck source=setup_lib.sh
. "$here/setup_lib.sh"
pip_install() { pip_install_with "$py" "$log" "$@"; }

bash "$here/setup_a1111.sh" "$shared" "$cache" >/dev/null  # its repositories/ and the HF cache
if [ ! -d "$root/repositories/k-diffusion" ]; then
    mkdir -p "$root/repositories"
    cp -a "$cache/a1111/repositories/." "$root/repositories/"
fi

if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    printf 'torch==2.13.0\ntorchvision==0.28.0\npydantic==1.10.15\n' > "$venv/constraints.txt"
    # reForge pins pydantic by a wheel URL: the index's 1.10.15 instead
    grep -v -E '^(torch|setuptools)\b|pydantic' "$root/requirements_versions.txt" > "$venv/requirements.txt"
    echo 'pydantic==1.10.15' >> "$venv/requirements.txt"
    pip_install -c "$venv/constraints.txt" torch==2.13.0 torchvision==0.28.0 "setuptools>=77.0.3,<81" wheel
    pip_install -c "$venv/constraints.txt" -r "$venv/requirements.txt"
    pip_install -c "$venv/constraints.txt" openai-clip ftfy regex tqdm
    "$py" "$shared/patch_torchvision_cpu.py" >/dev/null
    touch "$venv/.installed"
fi
echo "$root"
