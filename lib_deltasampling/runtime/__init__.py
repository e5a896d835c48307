"""Source-model runtime: pure torch + safetensors, no gradio, no host `modules`.

Reads single-file SD1.x / SD2.x / SDXL checkpoints, derives their configuration
from tensor shapes and predicts denoised latents. See docs/RUNTIME.md.
"""
