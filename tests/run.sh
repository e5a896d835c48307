#!/usr/bin/env bash
# Install the test dependencies into the current Python and run the test suite.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r tests/requirements.txt
# Only the real CLIP BPE vocabulary file is used from open_clip (never imported:
# it would need torchvision), hence --no-deps.
python -m pip install -q --no-deps open_clip_torch==3.3.0
python -m pytest tests "$@"
