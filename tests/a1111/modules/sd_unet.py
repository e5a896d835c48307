"""Mirrors modules/sd_unet.py with no "SD Unet" option active."""

current_unet = None


def apply_unet(option=None):
    pass
