"""Host-independent Delta Sampling: settings, schedule, latent bridge and the per-step sampler object.

Imports no gradio and no host `modules` (tests/test_boundaries.py); the WebUI adapters and the
standalone runner drive it with plain tensors and numbers.
"""
