"""Where the tests find the real CLIP BPE vocabulary: open_clip_torch's bundled file.

tests/run.sh installs open_clip_torch with --no-deps; the package is located, never imported
(importing it would need torchvision).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    assert spec and spec.submodule_search_locations, "tests need open_clip_torch: run `bash tests/run.sh`"
    return Path(list(spec.submodule_search_locations)[0])


def clip_vocab_path() -> Path:
    return open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
