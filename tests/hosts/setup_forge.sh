#!/usr/bin/env bash
# Prepare a real Forge-family WebUI for the real-host tests, offline except for the package index:
# unpack its tree from ../shared/hosts into the cache folder and make its own venv at the host's own
# pins, with ../shared/hosts/README.md's known-good CPU recipe: torch 2.14.1 + torchvision 0.29.1
# (pinned by a constraints file, or pip pulls another torch) and setuptools>=77.0.3,<81.
# Forge and Forge Neo ship their tokenizer/config files in backend/huggingface/: no HF cache needed.
# Idempotent: a finished step leaves a marker and is skipped next time.
# Usage: bash tests/hosts/setup_forge.sh forge|neo [SHARED_HOSTS_DIR] [CACHE_DIR]
# DS_FORGE_TREE / DS_NEO_TREE=<folder>: use that WebUI tree instead of unpacking the shipped one.
set -euo pipefail
host="${1:?usage: setup_forge.sh forge|neo}"
here="$(cd "$(dirname "$0")" && pwd)"
shared="${2:-${DS_SHARED_HOSTS:-$here/../../../shared/hosts}}"
cache="${3:-${DS_HOSTS_CACHE:-/var/tmp/sd-webui-delta-sampling/hosts}}"  # not under a dot-folder (gradio)
shared="$(cd "$shared" 2>/dev/null && pwd || echo "$shared")"  # not needed with DS_*_TREE
case "$host" in
    # joblib: the built-in soft-inpainting script imports it, the requirements file does not list it
    forge) tarball="forge-dfdcbab6.tar.gz"; tree="stable-diffusion-webui-forge"; reqs="requirements_versions.txt"
           first=""; then="joblib" ;;
    # as Neo's launch_utils.py: gradio first, then the requirements (whose Pillow 12 is newer than
    # gradio 4.40 declares; Neo runs so, and pip only warns when they come in that order)
    neo) tarball="forge-neo-2.26.tar.gz"; tree="sd-webui-forge-neo"; reqs="requirements.txt"
         first="gradio==4.40.0 gradio_rangeslider==0.0.8"; then="" ;;
    *) echo "unknown host '$host': use forge or neo" >&2; exit 2 ;;
esac
mkdir -p "$cache"
root="$cache/$host"
override_var="DS_$(echo "$host" | tr '[:lower:]' '[:upper:]')_TREE"  # DS_FORGE_TREE / DS_NEO_TREE
if [ -n "${!override_var:-}" ]; then  # a tree of your own (fetched, newer): used as it is
    root="$(cd "${!override_var}" && pwd)"
    touch "$root/.unpacked"
fi
venv="$cache/$host-venv"
py="$venv/bin/python"
log="$cache/setup-$host.log"
# shellcheck source=setup_lib.sh
. "$here/setup_lib.sh"
pip_install() { pip_install_with "$py" "$log" "$@"; }

if [ ! -f "$root/.unpacked" ]; then
    rm -rf "$root" "${cache:?}/$tree"
    tar -xzf "$shared/$tarball" -C "$cache"
    mv "$cache/$tree" "$root"
    if [ "$host" = neo ]; then
        # The shipped Neo tree keeps only the SD1.x/SDXL configs in backend/huggingface/; at start Neo
        # unpacks the Wan/Lumina/Z-Image/Flux2/ERNIE tokenizers from .xz archives that were left out.
        # SD models never read them: empty stand-ins let the start-up check pass.
        python3 - "$root/backend/huggingface/__init__.py" <<'PY'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("neo_hf", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
for name, path in vars(mod.Token).items():
    if not name.startswith("_") and not name.endswith("_compress") and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
PY
    fi
    touch "$root/.unpacked"
fi

if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$venv/constraints.txt"
    grep -v -E '^(torch|torchvision|setuptools)\b' "$root/$reqs" > "$venv/requirements.txt"
    pip_install -c "$venv/constraints.txt" torch==2.14.1 torchvision==0.29.1 "setuptools>=77.0.3,<81" wheel
    # shellcheck disable=SC2086
    [ -z "$first" ] || pip_install -c "$venv/constraints.txt" $first
    pip_install -c "$venv/constraints.txt" -r "$venv/requirements.txt"
    # shellcheck disable=SC2086
    [ -z "$then" ] || pip_install -c "$venv/constraints.txt" $then
    touch "$venv/.installed"
fi
echo "$root"
