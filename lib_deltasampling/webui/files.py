"""Names from the UI, infotext and API -> files, only inside the host's model folders.

Checkpoints resolve through the host's own checkpoint list (`sd_models.get_closet_checkpoint_match`);
adapters through the Lora extension's list when it is loaded, else by name in the LoRA folders.
A name never becomes a path outside those folders (`runtime.names`: exact names, no globs, no
traversal, no links out).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..runtime.names import find_named_file

ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def checkpoint_titles() -> list[str]:
    from modules import sd_models
    return list(sd_models.checkpoint_tiles())


def checkpoint_choice(info) -> str:
    """How the host's checkpoint dropdowns name `info` (`sd_models.checkpoint_tiles`): A1111 shows
    titles ("name.safetensors [hash]"), Forge and Forge Neo names without the hash."""
    from modules import sd_models
    return info.title if info.title in set(sd_models.checkpoint_tiles()) else info.name


def checkpoint_file(name: str, setting: str) -> Path:
    from modules import sd_models
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    if info is None:
        raise UserError(setting, f"'{name}' is not in the WebUI's checkpoint list",
                        "Pick it from the dropdown (press the refresh button after adding files)")
    return Path(info.filename)


def _lora_dirs() -> list[Path]:
    """The LoRA folders: --lora-dir, A1111's --lyco-dir-backcompat, Forge Neo's --lora-dirs (a list)."""
    from modules import shared
    opts = shared.cmd_opts
    dirs = [getattr(opts, "lora_dir", None), getattr(opts, "lyco_dir_backcompat", None),
            *(getattr(opts, "lora_dirs", None) or [])]
    return [Path(d) for d in dirs if d]


def folder_loras() -> list[str]:
    """LoRA names found in the LoRA folders (used when the Lora extension's list is not loaded)."""
    names = {p.stem for d in _lora_dirs() if d.is_dir() for s in ADAPTER_SUFFIXES for p in d.rglob("*" + s)}
    return sorted(names, key=str.lower)


def host_network(name: str):
    """The Lora extension's entry (`NetworkOnDisk`) for `<lora:name>`, by name then alias; None when
    the extension is not loaded or does not list it."""
    import sys
    networks = sys.modules.get("networks")
    for table in ("available_networks", "available_network_aliases"):
        entry = getattr(networks, table, {}).get(name) if networks else None
        if entry is not None:
            return entry
    return None


def adapter_file(name: str) -> Path:
    """The file of `<lora:name>`: the host's list first (also its aliases), then the LoRA folders."""
    entry = host_network(name)
    if entry is not None:
        return Path(entry.filename)
    return find_named_file(name, _lora_dirs(), ADAPTER_SUFFIXES, f"adapter <lora:{name}>",
                           "Check the name (the LoRA tab shows them) and refresh the list after adding files")


def embedding_dirs() -> list[Path]:
    from modules import shared
    d = getattr(shared.cmd_opts, "embeddings_dir", None)
    return [Path(d)] if d and Path(d).is_dir() else []


MODEL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")


def _model_dirs(kind: str) -> list[Path]:
    """Where each kind of extra model lives in the WebUIs. ControlNets: --controlnet-dir
    (sd-webui-controlnet, Forge), models/ControlNet (every host), sd-webui-controlnet's own models
    folder and its settings-page path. IP-Adapters: where sd-webui-controlnet and Forge keep them
    (the ControlNet folders) and models/ipadapter. CLIP vision encoders: models/clip_vision (Forge,
    ComfyUI) and sd-webui-controlnet's download folder (clip_h.pth)."""
    from modules import paths, shared
    models, root = Path(paths.models_path), Path(paths.script_path)
    controlnet = [getattr(shared.cmd_opts, "controlnet_dir", None), models / "ControlNet",
                  root / "extensions" / "sd-webui-controlnet" / "models",
                  getattr(shared.opts, "data", {}).get("control_net_models_path") or None]
    dirs = {"controlnet": controlnet,
            "ipadapter": [models / "ipadapter", *controlnet],
            "clipvision": [models / "clip_vision",
                           root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "clip_vision"]}[kind]
    seen, out = set(), []
    for d in dirs:
        if d and Path(d).is_dir() and Path(d).resolve() not in seen:
            seen.add(Path(d).resolve())
            out.append(Path(d))
    return out


MODEL_WHAT = {"controlnet": "ControlNet", "ipadapter": "IP-Adapter", "clipvision": "CLIP vision encoder"}


def model_names(kind: str) -> list[str]:
    """Names (file names without the suffix) of the `kind` models in their folders."""
    names = {p.stem for d in _model_dirs(kind) for s in MODEL_SUFFIXES for p in d.rglob("*" + s)}
    return sorted(names, key=str.lower)


def model_file(kind: str, name: str) -> Path:
    what = MODEL_WHAT[kind]
    return find_named_file(name, _model_dirs(kind), MODEL_SUFFIXES, f'{what} "{name}"',
                           f"Pick it from the Delta Sampling {what} list (press refresh after adding files)")
