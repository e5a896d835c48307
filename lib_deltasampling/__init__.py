"""Delta Sampling for Stable Diffusion WebUI (A1111, Forge, reForge).

Imports nothing heavy: the WebUI loads this package at start-up, and the
extension must cost nothing while its accordion is off.
"""

__version__ = "0.1.0"
