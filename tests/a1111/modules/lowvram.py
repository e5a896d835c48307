"""Mirrors modules/lowvram.py with --lowvram/--medvram off."""


def is_enabled(sd_model):
    return getattr(sd_model, "lowvram", False)


def is_needed(sd_model):
    return False


def send_everything_to_cpu():
    pass
