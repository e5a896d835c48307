"""The standalone runner (`python -m lib_deltasampling generate`): target + source pair, sampler,
VAE decode, PNG with A1111-format infotext. Uses only the runtime and the engine."""
