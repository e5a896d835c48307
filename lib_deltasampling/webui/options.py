"""The "Delta Sampling" section of the WebUI's Settings page, and reading it.

`register_options` runs from `script_callbacks.on_ui_settings`; `shared.opts.add_option` keeps a
value already saved in config.json. `read_options` may run before the section exists (UI build,
API start-up), so every key is read with `getattr(shared.opts, key, default)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("delta-sampling")

SECTION = ("delta_sampling", "Delta Sampling")
CATEGORY = "sd"                      # A1111's "Stable Diffusion" settings category
DTYPES = ("auto", "fp16", "bf16", "fp32", "fp8")
LOG_LEVELS = ("WARNING", "INFO", "DEBUG")
KEY_PREFIX = "delta_sampling_"


@dataclass(frozen=True)
class WebuiOptions:
    """Settings-page values (defaults = what a fresh install uses)."""

    device: str = "auto"                        # auto, cuda, cuda:N, cpu, mps
    dtype: str = "auto"                         # auto, fp16, bf16, fp32, fp8 (UNet weights in 8 bits)
    keep_loaded: bool = True                    # keep the source models between generations
    free_on_checkpoint_change: bool = False     # free them when the WebUI's checkpoint changes
    vocab_path: str = ""                        # CLIP vocabulary file/folder; empty: search
    log_level: str = "INFO"                     # INFO: one line per generation that ran the delta
    cuda_graphs: bool = True                    # replay the source's step as a CUDA graph (NVIDIA GPUs)
    low_vram: bool = False                      # text encoders and models on the CPU when not computing

    def placement(self):
        """Device and dtype of the source models (runtime/placement.py; checks the device exists)."""
        from ..runtime.placement import choose_placement
        return choose_placement(self.device, self.dtype)

    def low_vram_now(self) -> bool:
        """The option, or the WebUI's own --lowvram/--medvram."""
        from modules import shared
        opts = shared.cmd_opts
        return self.low_vram or bool(getattr(opts, "lowvram", False) or getattr(opts, "medvram", False))

    def vocab_paths(self) -> tuple[Path, ...]:
        return (Path(self.vocab_path.strip()).expanduser(),) if self.vocab_path.strip() else ()

    @staticmethod
    def webui_root() -> Path | None:
        """The WebUI's folder (where the tokenizer search also looks)."""
        try:
            from modules import paths_internal
        except ImportError:
            return None
        root = getattr(paths_internal, "script_path", None)
        return Path(root) if root else None


def option_key(name: str) -> str:
    return KEY_PREFIX + name


LABELS = {
    "device": "Device for the source models (auto: the WebUI's GPU; cuda:N for another GPU)",
    "dtype": "Precision of the source models (auto: fp16 on GPUs, fp32 on the CPU; fp8: the UNet's weights "
             "stored in 8 bits, half the memory, computed as auto)",
    "keep_loaded": "Keep the source models loaded between generations",
    "free_on_checkpoint_change": "Free the source models when the WebUI's checkpoint changes",
    "vocab_path": "CLIP tokenizer vocabulary (bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json and "
                  "merges.txt); empty: search the usual places",
    "log_level": "Console messages of Delta Sampling",
    "cuda_graphs": "Replay the source model's step as a CUDA graph (NVIDIA GPUs)",
    "low_vram": "Low VRAM: keep the source's text encoders on the CPU except while encoding, and the source "
                "models on the CPU between generations",
}


class ConsoleHandler(logging.StreamHandler):
    """Prints the "delta-sampling" logger's records on the console while the host has not
    configured logging. A1111 1.10 adds a root handler only when SD_WEBUI_LOG_LEVEL (or
    --loglevel) is set (modules/logging_config.py `setup_logging`, which leaves an already
    configured root alone); without one, an INFO record would go nowhere. When the root logger has
    a handler, our records propagate to it and this one stays quiet (no line twice). While tqdm
    progress bars are on screen it writes through `tqdm.write`, as A1111's TqdmLoggingHandler does."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            from tqdm import tqdm
            if getattr(tqdm, "_instances", None):
                tqdm.write(self.format(record), file=self.stream)
                return
        except Exception:  # noqa: BLE001 - no tqdm, or it failed: print plainly
            pass
        super().emit(record)


def install_console_handler() -> None:
    """Once per process (a script reload keeps the one handler)."""
    logger = logging.getLogger("delta-sampling")
    if not any(type(h).__name__ == ConsoleHandler.__name__ for h in logger.handlers):
        logger.addHandler(ConsoleHandler())


def apply_log_level(level: str | None = None) -> None:
    """Set the "delta-sampling" logger's level (from the settings page when not given) and make
    sure its records reach the console."""
    level = level or read_options().log_level
    install_console_handler()
    logging.getLogger("delta-sampling").setLevel(getattr(logging, level, logging.INFO))


def device_component_args() -> dict[str, Any]:
    """The device dropdown's choices, computed when the settings page is built or loaded (A1111's
    `ui_settings.py` calls a callable `component_args` there). A1111 passes these keys both to the
    component's constructor and, on every page load (`get_value_for_setting`), to gradio's
    `Component.update()`, so only keys both accept may appear: gradio 3.41's `Dropdown.update` has
    no `allow_custom_value`. A saved value this machine does not list (e.g. cuda:3 from another
    machine) is added to the choices so it still shows; `read_options` reads it as saved and the
    placement check says why it cannot be used."""
    from ..runtime.placement import device_choices

    choices = device_choices()
    current = read_options().device
    if current not in choices:
        choices.append(current)
    return {"choices": choices}


def _option_infos(shared: Any, gr: Any) -> dict[str, Any]:
    d = WebuiOptions()
    info = shared.OptionInfo
    return {
        "device": info(d.device, LABELS["device"], gr.Dropdown, device_component_args),
        "dtype": info(d.dtype, LABELS["dtype"], gr.Radio, {"choices": list(DTYPES)}),
        "keep_loaded": info(d.keep_loaded, LABELS["keep_loaded"]).info(
            "off: freed after every generation, which saves memory but reloads them each time"),
        "free_on_checkpoint_change": info(d.free_on_checkpoint_change, LABELS["free_on_checkpoint_change"]).info(
            "frees memory for the new checkpoint when GPU memory is short"),
        "vocab_path": info(d.vocab_path, LABELS["vocab_path"]),
        "log_level": info(d.log_level, LABELS["log_level"], gr.Radio, {"choices": list(LOG_LEVELS)},
                          onchange=apply_log_level),
        "cuda_graphs": info(d.cuda_graphs, LABELS["cuda_graphs"]).info(
            "fewer kernel launches per step; turn off if a driver or another extension has trouble with it"),
        "low_vram": info(d.low_vram, LABELS["low_vram"]).info(
            "on by itself when the WebUI runs with --lowvram or --medvram; costs a copy over PCIe per pass"),
    }


def register_options() -> None:
    """`on_ui_settings` callback: add the section (values saved in config.json are kept)."""
    import gradio as gr
    from modules import shared

    for name, option in _option_infos(shared, gr).items():
        option.section = SECTION
        option.category_id = CATEGORY
        shared.opts.add_option(option_key(name), option)
    apply_log_level()


def read_options() -> WebuiOptions:
    """The current settings; a value of the wrong type or outside its choices is its default (warned)."""
    from modules import shared

    defaults = WebuiOptions()
    values = {}
    for f in fields(WebuiOptions):
        default = getattr(defaults, f.name)
        value = getattr(shared.opts, option_key(f.name), default)
        values[f.name] = value if _valid(f.name, value, default) else default
    return WebuiOptions(**values)


def _valid(name: str, value: Any, default: Any) -> bool:
    allowed = {"dtype": DTYPES, "log_level": LOG_LEVELS}.get(name)
    ok = isinstance(value, type(default)) and (allowed is None or value in allowed)
    if name == "device" and ok:
        ok = value.strip() != ""
    if not ok:
        log.warning("Delta Sampling setting %s = %r is not valid; using %r", option_key(name), value, default)
    return ok
