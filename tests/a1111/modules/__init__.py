"""Stand-in for AUTOMATIC1111 stable-diffusion-webui 1.10.1's `modules` package (tests only).

Each submodule names the real file and functions it mirrors (read at tag v1.10.1). Behaviour,
signatures, data layouts and call order follow A1111; models are tiny CPU checkpoints run by
`lib_deltasampling.runtime`; images stay latents (no VAE). See tests/a1111/fixture.py.
"""
