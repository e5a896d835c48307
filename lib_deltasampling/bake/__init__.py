"""Baking an adaptation into a file for another model, once (ProLoRA projection)."""
