"""Mirrors modules/sd_models.py (1.10.1), with tiny CPU models.

- `CheckpointInfo(filename)`: `name` (path relative to --ckpt-dir or models/Stable-diffusion,
  else the basename), `name_for_extra`, `model_name`, `hash` (legacy 8-hex `model_hash`),
  `sha256` (from the hash cache only), `shorthash`, `title` ("name [shorthash]" or name),
  `short_title`, `ids`, `metadata`, `is_safetensors`, `register()`, `calculate_shorthash()`
  (computes the sha256, re-registers under the new title, keeping the dict position).
- `checkpoints_list` (title -> info), `checkpoint_aliases`, `checkpoint_tiles(use_short)`,
  `list_models()` (rescan of `model_path` and --ckpt-dir: .ckpt/.safetensors, not *.vae.*,
  natural sort), `get_closet_checkpoint_match(s)` [sic], `select_checkpoint()`, `model_hash`,
  `read_metadata_from_safetensors`.
- `load_model(info)` / `reload_model_weights(sd_model=None, info=None)`: replace
  `shared.sd_model` by a `StandInSdModel` for that checkpoint (weights from
  `lib_deltasampling.runtime`), write `opts.sd_model_checkpoint` unless inside
  `SkipWritingToConfig`, fire `on_model_loaded`; reloading the checkpoint already loaded is a
  no-op (no callback), as with sd_checkpoints_limit = 1.
- `StandInSdModel`: the attributes A1111's `sd_model` exposes to extensions (see the class).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import types

import torch

import _standin_support as _support
from modules import errors, hashes, paths, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoint_alisases = checkpoint_aliases   # [sic] old name kept by A1111
checkpoints_loaded = {}


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def replace_key(d, key, new_key, value):
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    keys[keys.index(key)] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        json_data = json.loads(json_start + file.read(metadata_len - 2))
    res = {}
    for k, v in json_data.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == '{':
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"

        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]

        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading metadata for {filename}")

        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f'{name} [{self.hash}]']
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']
        old_title = self.title
        self.title = f'{self.name} [{self.shorthash}]'
        self.short_title = f'{self.name_for_extra} [{self.shorthash}]'
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def model_hash(filename):
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return 'NOFILE'


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _natural_key(s):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', s)]


def _walk_files(path, allowed_extensions):
    if not os.path.exists(path):
        return
    items = sorted(os.walk(path, followlinks=True), key=lambda x: _natural_key(x[0]))
    for root, _, files in items:
        for filename in sorted(files, key=_natural_key):
            if os.path.splitext(filename)[1].lower() in allowed_extensions:
                yield os.path.join(root, filename)


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    places = []
    ckpt_dir = shared.cmd_opts.ckpt_dir
    if ckpt_dir is not None and ckpt_dir != model_path and os.path.exists(ckpt_dir):
        places.append(ckpt_dir)
    places.append(model_path)
    found = []
    for place in places:
        for full_path in _walk_files(place, {".ckpt", ".safetensors"}):
            if any(full_path.endswith(x) for x in (".vae.ckpt", ".vae.safetensors")):
                continue
            if full_path not in found:
                found.append(full_path)
    for filename in found:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string, None)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    without_checksum = re.sub(re_strip_checksum, '', search_string)
    found = sorted([i for i in checkpoints_list.values() if without_checksum in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    return None


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    info = checkpoint_aliases.get(model_checkpoint, None)
    if info is not None:
        return info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError(f"No checkpoints found. When searching for checkpoints, looked at:\n - directory {model_path}"
                                "Can't run without a checkpoint. Find and place a .ckpt or .safetensors file into any of those locations.")
    return next(iter(checkpoints_list.values()))


class SkipWritingToConfig:
    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


_CONFIGS = {"sd1": "configs/v1-inference.yaml", "sd2": "configs/v2-inference.yaml",
            "sd2-v": "configs/v2-inference-v.yaml", "sdxl": "configs/sd_xl_base.yaml"}


class StandInSdModel:
    """What `shared.sd_model` offers an extension in A1111 1.10.1 (an ldm `LatentDiffusion` or sgm
    `DiffusionEngine` after `sd_models.load_model`), backed by a runtime `SourceModel`:

    `sd_checkpoint_info`, `sd_model_checkpoint` (filename), `sd_model_hash`, `is_sd1/is_sd2/
    is_sdxl/is_ssd/is_sd3/is_sdxl_inpaint`, `model_type`, `parameterization` ("eps"/"v"),
    `scale_factor`, `latent_channels`, `alphas_cumprod` (float32 [1000]), `cond_stage_key`,
    `model.conditioning_key` ("crossattn"), `used_config`, `cond_stage_model_empty_prompt`,
    `lowvram`, `get_learned_conditioning(SdConditioning)` (tensor [N, 77k, dim], or for SDXL
    {'crossattn', 'vector'}), `apply_model(x, t, cond)` (ldm convention: raw UNet output, eps or
    v; `cond` = {'c_crossattn': [t], 'c_concat': [..]} or SDXL {'crossattn', 'vector', 'c_concat'}),
    `ema_scope()`. `source` is the runtime model (stand-in only).
    """

    def __init__(self, checkpoint_info: CheckpointInfo):
        self.source = _support.source_model(checkpoint_info.filename)
        family = self.source.family.value
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = checkpoint_info.filename
        self.sd_model_hash = None
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd1", family == "sd2", family == "sdxl"
        self.is_ssd = self.is_sd3 = self.is_sdxl_inpaint = False
        self.model_type = {"sd1": ModelType.SD1, "sd2": ModelType.SD2, "sdxl": ModelType.SDXL}[family]
        self.parameterization = self.source.prediction
        self.scale_factor = self.source.latent_scale
        self.latent_channels = 4
        self.alphas_cumprod = self.source.denoiser.schedule.alphas_cumprod.float()
        self.cond_stage_key = "txt"
        self.model = types.SimpleNamespace(conditioning_key="crossattn", diffusion_model=self.source.unet)
        self.used_config = _CONFIGS["sd2-v" if family == "sd2" and self.parameterization == "v" else family]
        self.lowvram = False
        self.cond_stage_model_empty_prompt = self._crossattn(self.get_learned_conditioning(
            _sd_conditioning([""], width=512, height=512)))

    @staticmethod
    def _crossattn(cond):
        return cond["crossattn"] if isinstance(cond, dict) else cond

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def ema_scope(self, context=None):
        return contextlib.nullcontext()

    def get_learned_conditioning(self, texts):
        width = getattr(texts, "width", None) or 512
        height = getattr(texts, "height", None) or 512
        negative = getattr(texts, "is_negative_prompt", False)
        with torch.no_grad():
            out = self.source.encode(list(texts), width=width, height=height, negative=negative)
        if self.is_sdxl:
            return {"crossattn": out["context"], "vector": out["y"]}
        return out["context"]

    def apply_model(self, x, t, cond):
        if "c_crossattn" in cond:
            context, y = torch.cat(cond["c_crossattn"], 1), None
        else:
            context, y = cond["crossattn"], cond["vector"]
        with torch.no_grad():
            if y is None:
                return self.source.unet(x, t, context)
            return self.source.unet(x, t, context, y=y)


def _sd_conditioning(prompts, **kwargs):
    from modules.prompt_parser import SdConditioning
    return SdConditioning(prompts, **kwargs)


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    checkpoint_info = checkpoint_info or select_checkpoint()
    sd_model = StandInSdModel(checkpoint_info)
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    shared.sd_model = sd_model
    checkpoints_loaded[checkpoint_info.filename] = sd_model
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or shared.sd_model
    if sd_model is None:
        return load_model(checkpoint_info)
    if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    return load_model(checkpoint_info)


def unload_model_weights(sd_model=None, info=None):
    shared.sd_model = None


def apply_token_merging(sd_model, token_merging_ratio):
    pass


def apply_alpha_schedule_override(sd_model, p=None):
    pass

