"""A labelled image grid (the runner's --compare-converted): columns side by side, one row per
image of the batch, a caption strip above each column. Captions need Pillow (any WebUI has it);
without it the grid has no strip and the captions are only in the PNG text."""

from __future__ import annotations

import numpy as np

CAPTION_HEIGHT = 24


def caption_strip(text: str, width: int) -> np.ndarray | None:
    """[CAPTION_HEIGHT, width, 3] uint8: black text on white, or None without Pillow."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    strip = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 6), text, fill=(0, 0, 0))
    return np.asarray(strip)


def labelled_grid(columns: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """columns: each [B, H, W, 3] uint8 (same shapes) -> one [caption + B*H, n*W, 3] image."""
    if not columns or len(columns) != len(labels):
        raise ValueError("one label per column")
    shape = columns[0].shape
    if any(c.shape != shape for c in columns):
        raise ValueError(f"columns differ in shape: {[c.shape for c in columns]}")
    body = np.concatenate([np.concatenate(list(c), axis=0) for c in columns], axis=1)   # rows, then columns
    strips = [caption_strip(label, shape[2]) for label in labels]
    if any(s is None for s in strips):
        return body
    return np.concatenate([np.concatenate(strips, axis=1), body], axis=0)
