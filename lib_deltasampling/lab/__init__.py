"""The quality lab: a miniature world (procedural images and captions), small SD1- and SDXL-layout
models trained on it in the real single-file layouts, LoRAs, a classifier for metrics, the study
that measures how well Delta Sampling transfers an adaptation, and the demo. Host-free: it uses
the runtime, the engine and the runner only, and is imported only by its own commands."""

from pathlib import Path

DEFAULT_FOLDER = Path(__file__).parent / "minis"   # the shipped models (lab/train.py writes them)
