"""`python -m lib_deltasampling generate`: Delta Sampling end to end, without a WebUI.

    python -m lib_deltasampling generate --target sdxl.safetensors --source sd15.safetensors \\
        --adapters "<lora:moxin:0.8> shuimobysim" --lora-dir models/Lora --scale 3 \\
        --prompt "a fox in the snow" --steps 30 --cfg 5 --sampler "DPM++ 2M" --schedule-type Karras \\
        --width 1024 --height 1024 --seed 42 --out fox.png --compare

The target (any supported family) runs on the same runtime as the source pair. Each image is
written as a PNG with an A1111-format `parameters` chunk: the WebUI's PNG Info reads it and the
Delta Sampling settings paste back. Every Delta Sampling setting is a flag generated from the one
settings definition (engine/settings.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..engine.infotext import (ADAPTER_HASHES, ADAPTED_HASH, CONTROL_HASH, IP_HASH, SOURCE_HASH,
                               format_parameters, settings_to_infotext)
from ..engine.sampler import DeltaSampler
from ..engine.settings import ControlImage, DeltaSettings, field
from ..errors import SettingError, UserError
from ..runtime.adapters.apply import AdapterSet
from ..runtime.adapters.tags import adapter_requests
from ..runtime.checkpoint import open_store
from ..runtime.detect import Family
from ..runtime.model import Cond, SourceModel, load_model
from ..runtime.names import find_named_file
from ..runtime.pair import SourcePair
from ..runtime.placement import choose_placement
from ..runtime.text.embeddings import EmbeddingLibrary
from ..runtime.text.prompt import check_prompt, extract_extra_networks
from ..runtime.text.tokenizer import ClipTokenizer
from ..runtime.vae import load_vae_decoder, open_vae, to_uint8_images
from . import hashcache
from .cli import ADAPTER_SUFFIXES, MAX_BATCH, MAX_CFG, MAX_SIZE, MAX_STEPS, settings_from_args
from .outputs import plan_outputs, write_atomic
from .png import write_png
from .sampling import (ImageNoise, fixed_seed, get_sigmas, image_seeds, infotext_schedule,
                       initial_noise_multiplier, latent_shape, parse_sampler)

def _check_args(args: argparse.Namespace) -> None:
    for name, value, high in (("--steps", args.steps, MAX_STEPS), ("--batch", args.batch, MAX_BATCH)):
        if not 1 <= value <= high:
            raise SettingError(name, f"{value} is outside 1 to {high}", f"Use a value from 1 to {high}")
    for name, value in (("--width", args.width), ("--height", args.height)):
        if not 64 <= value <= MAX_SIZE or value % 8:
            raise SettingError(name, f"{value} is not a multiple of 8 from 64 to {MAX_SIZE}",
                               "Use e.g. 512, 768 or 1024")
    if not (math.isfinite(args.cfg) and 0 <= args.cfg <= MAX_CFG):
        raise SettingError("--cfg", f"{args.cfg} is not a CFG scale from 0 to {MAX_CFG:g}", "Use a value such as 7")
    image_seeds(0 if args.seed == -1 else args.seed, args.batch)  # raises for seeds torch cannot take


def _check_paths(args: argparse.Namespace) -> None:
    for flag, path in (("--target", args.target), ("--source", args.source), ("--adapted", args.adapted),
                       ("--vae", args.vae), ("--control", args.control), ("--control-image", args.control_image),
                       ("--ip-adapter", args.ip_adapter), ("--ip-encoder", args.ip_encoder),
                       ("--ip-image", args.ip_image), ("--compare-converted", getattr(args, "compare_converted", None))):
        if path is not None and not path.is_file():
            problem = "is a folder, not a model file" if path.is_dir() else "file not found"
            raise UserError(str(path), problem, f"Give {flag} the path of a model file")
    for flag, folders in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir)):
        for folder in folders:
            if not folder.is_dir():
                raise SettingError(flag, f"{folder} is not a folder", "Give the folder that holds the files")


def find_adapter(name: str, folders: list[Path]) -> Path:
    """The file of `<lora:NAME>`: NAME + a known suffix in the --lora-dir folders (recursively), matched
    exactly; a name is never a path or a glob, and a file linked from outside the folders is refused."""
    return find_named_file(name, folders, ADAPTER_SUFFIXES, f"adapter <lora:{name}>",
                           "Pass --lora-dir with the folder that holds it")


@dataclass
class Prompts:
    target: list[str]
    target_negative: list[str]
    base: list[str]
    base_negative: list[str]
    adapted: list[str]
    adapted_negative: list[str]


def build_prompts(settings: DeltaSettings, prompt: str, negative: str, batch: int) -> tuple[Prompts, list]:
    """Prompts per branch, as the WebUI extension will build them: extra-network tags never reach a text
    encoder; the source uses its override or the host's prompt; the adapted prompt adds the adapter
    text's words (trigger words, embedding names); the adapter tags choose the adapters."""
    host, host_tags = extract_extra_networks(prompt)
    host_negative, _ = extract_extra_networks(negative)
    if host_tags:
        print(f"note: extra-network tags in --prompt are ignored by the runner's target: "
              f"{', '.join('<' + t.network + ':' + ':'.join(t.items) + '>' for t in host_tags)}", file=sys.stderr)
    base = extract_extra_networks(settings.source_prompt)[0] if settings.source_prompt else host
    base_negative = extract_extra_networks(settings.source_negative)[0] if settings.source_negative else host_negative
    words, requests = adapter_requests(settings.adapters)
    words = " ".join(words.split())
    adapted = f"{base}, {words}" if base and words else (base or words)
    return Prompts([host] * batch, [host_negative] * batch, [base] * batch, [base_negative] * batch,
                   [adapted] * batch, [base_negative] * batch), requests


def cfg_conditioning(model: SourceModel, prompts: list[str], negatives: list[str], width: int, height: int) -> Cond:
    """[uncond rows, cond rows] in one batch, token lengths padded to match (A1111's pad option)."""
    cond = model.text.encode(prompts)
    uncond = model.text.encode(negatives, negative=True)
    chunks = max(cond.context.shape[1], uncond.context.shape[1]) // 77
    cond, uncond = model.text.pad_to_chunks(cond, chunks), model.text.pad_to_chunks(uncond, chunks)
    u, c = model.cond_from(uncond, width=width, height=height), model.cond_from(cond, width=width, height=height)
    return {k: torch.cat([u[k], c[k]]) for k in u}


class Progress:
    def __init__(self, total: int, label: str, quiet: bool) -> None:
        self.total, self.label, self.quiet, self.start = total, label, quiet, time.perf_counter()

    def __call__(self, step: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.quiet:
            return
        done = step + 1
        bar = "#" * (24 * done // self.total)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        end = "\n" if done == self.total else ""
        print(f"\r{self.label} [{bar:<24}] {done}/{self.total} {rate:.2f} it/s", end=end, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> list[Path]:
    _check_args(args)
    settings = settings_from_args(args)
    for text in (args.prompt, args.negative, settings.source_prompt, settings.source_negative, settings.adapters):
        check_prompt(text)
    prompts, requests = build_prompts(settings, args.prompt, args.negative, args.batch)
    sampler, schedule = parse_sampler(args.sampler, args.schedule_type)
    placement = choose_placement(args.device, args.dtype)
    _check_paths(args)
    if (args.control is None) != (args.control_image is None):
        raise SettingError("--control / --control-image", "a ControlNet needs its control image and the other way round",
                           "Give both --control FILE and --control-image IMAGE, or neither")
    control_image = (ControlImage.of(args.control_image.read_bytes(), str(args.control_image))
                     if args.control_image else None)
    ip_given = [args.ip_adapter is not None, args.ip_encoder is not None, args.ip_image is not None]
    if any(ip_given) and not all(ip_given):
        raise SettingError("--ip-adapter / --ip-encoder / --ip-image", "an IP-Adapter needs all three",
                           "Give --ip-adapter FILE --ip-encoder CLIP_VISION_FILE --ip-image IMAGE, or none of them")
    ip_image = ControlImage.of(args.ip_image.read_bytes(), str(args.ip_image)) if args.ip_image else None
    settings = settings.replace(control_image=control_image or "", ip_image=ip_image or "")
    adapter_files = [(request.name, find_adapter(request.name, args.lora_dir)) for request in requests]
    seeds = image_seeds(fixed_seed(args.seed), args.batch)
    converted = getattr(args, "compare_converted", None)
    if converted is not None and not requests:
        raise SettingError("--compare-converted", "there is no adapter to compare with",
                           "Give the original LoRA in --adapters \"<lora:NAME:1>\" and its converted file here")
    outputs = plan_outputs(args.out, seeds, compare=args.compare, latent_out=args.latent_out,
                           overwrite=args.overwrite, grid=converted is not None,
                           inputs=[args.target, args.source, args.adapted, args.vae, args.control, args.control_image,
                                   args.ip_adapter, args.ip_encoder, args.ip_image, converted,
                                   *(p for _, p in adapter_files)])

    tokenizer = ClipTokenizer.find(args.vocab, configure="--vocab")
    target = load_model(args.target, prediction=args.prediction, placement=placement, tokenizer=tokenizer,
                        timestep_mode=args.timesteps)
    vae = load_vae_decoder(open_vae(args.vae) if args.vae else open_store(args.target), placement.device)
    source = load_model(args.source, prediction=args.source_prediction, placement=placement, tokenizer=tokenizer,
                        timestep_mode=args.timesteps)
    if converted is not None:
        from ..bake.convert import architecture_problem
        if (problem := architecture_problem(source.info, target.info)) is not None:
            raise SettingError("--compare-converted", f"{problem} ({args.source.name}, {args.target.name}), so no "
                               "LoRA can be converted or copied between them",
                               "Compare on a target of the source's architecture")
    adapted = (load_model(args.adapted, prediction=args.source_prediction, placement=placement, tokenizer=tokenizer,
                          timestep_mode=args.timesteps) if args.adapted else None)
    adapted_model = adapted or source
    adapters = AdapterSet(adapted_model.components(), adapted_model.family, source_name=args.source.name)
    for request, (_, path) in zip(requests, adapter_files):
        adapters.add(path, name=request.name, unet_multiplier=request.unet_multiplier,
                     te_multiplier=request.te_multiplier)
    image_prompt = None
    if args.ip_adapter is not None:
        from ..runtime.clip_vision import load_clip_vision
        from ..runtime.ipadapter import load_ip_adapter
        ip = load_ip_adapter(args.ip_adapter, device=placement.device, dtype=placement.dtype)
        encoder = load_clip_vision(args.ip_encoder, device=placement.device, dtype=placement.dtype)
        image_prompt = settings.to_image_prompt(ip, encoder, adapted_model.unet)
    pair = SourcePair(source, adapters, adapted, image_prompt)
    control = None
    if args.control is not None:
        from ..runtime.controlnet import load_controlnet
        net = load_controlnet(args.control, device=placement.device, dtype=placement.dtype, for_family=source.family)
        control = settings.to_control(net)
        control.check(source)
    library = EmbeddingLibrary.for_text_stack(args.embeddings_dir, source.text) if args.embeddings_dir else None

    sigmas = get_sigmas(schedule, args.steps, target.denoiser.schedule, sampler=sampler,
                        sdxl=target.family is Family.SDXL)
    steps = len(sigmas) - 1
    c0 = initial_noise_multiplier(sigmas)
    cfg_cond = cfg_conditioning(target, prompts.target, prompts.target_negative, args.width, args.height)

    def generate(with_delta: bool, label: str, target_adapters: AdapterSet | None = None) -> torch.Tensor:
        if target_adapters is not None:      # a LoRA on the target itself: its text encoders too
            with target_adapters.applied():
                cond = cfg_conditioning(target, prompts.target, prompts.target_negative, args.width, args.height)
                return _sample(with_delta, label, cond)
        return _sample(with_delta, label, cfg_cond)

    def _sample(with_delta: bool, label: str, target_cond: dict) -> torch.Tensor:
        noise_source = ImageNoise(seeds, latent_shape(args.width, args.height), placement.device)
        noise = noise_source.first()
        delta = None
        if with_delta:
            delta = DeltaSampler.prepare(
                pair, settings.to_params(), prompts=prompts.base, negative_prompts=prompts.base_negative,
                adapted_prompts=prompts.adapted, adapted_negative_prompts=prompts.adapted_negative, steps=steps,
                cfg_scale=args.cfg, target_scale=target.latent_scale, noise=noise, noise_multiplier=c0,
                sigma0=float(sigmas[0]),
                embeddings=library.for_prompt(prompts.base) if library else {},
                adapted_embeddings=library.for_prompt(prompts.adapted) if library else {},
                cuda_graphs=args.cuda_graphs, control=control)

        def model(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
            if delta is not None:
                delta.prefetch(x, sigma, step, steps)  # a replayed source step overlaps the target's forward
            both = target.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), target_cond)
            uncond, cond = both.chunk(2)
            denoised = uncond + args.cfg * (cond - uncond)
            return delta(x, sigma, step, steps, denoised) if delta is not None else denoised

        x = noise * c0
        with torch.inference_mode(), (delta.running() if delta else nullcontext()):
            return sampler(model, x, sigmas.to(placement.device), callback=Progress(steps, label, args.quiet),
                           noise_sampler=noise_source.noise_sampler())

    latents = generate(True, "delta")
    params = _infotext(args, settings, sampler, schedule, steps, adapter_files)
    written = _write_images(vae, target, latents, prompts, seeds, params, outputs.images, outputs.overwrite)
    if args.compare:
        plain = {k: v for k, v in params.items() if not k.startswith("Delta ")}
        written += _write_images(vae, target, generate(False, "target"), prompts, seeds, plain,
                                 outputs.plain_images, outputs.overwrite)
    if outputs.grid is not None:
        written.append(_converted_grid(args, target, vae, latents, generate, requests, adapter_files, converted,
                                       prompts, seeds, params, outputs))
    if outputs.latent:
        from safetensors.torch import save
        data = save({"latent": latents.float().cpu().contiguous()},
                    metadata={"parameters": format_parameters(prompts.target[0], prompts.target_negative[0],
                                                              {**params, "Seed": seeds[0]})})
        written.append(write_atomic(outputs.latent, data, overwrite=outputs.overwrite))
    return written


def _converted_grid(args, target: SourceModel, vae, latents: torch.Tensor, generate, requests, adapter_files,
                    converted: Path, prompts: Prompts, seeds: list[int], params: dict, outputs) -> Path:
    """--compare-converted: the Delta Sampling images | the target with the converted LoRA | the
    target with the original adapters copied unchanged, one row per image, captioned."""
    from .grid import labelled_grid

    def on_target(files: list[tuple[str, Path, float, float]]) -> AdapterSet:
        adapters = AdapterSet(target.components(), target.family, source_name=args.target.name)
        for name, path, te, unet in files:
            adapters.add(path, name=name, te_multiplier=te, unet_multiplier=unet)
        return adapters

    first = requests[0]
    with_converted = on_target([(converted.stem, converted, first.te_multiplier, first.unet_multiplier)])
    copied = on_target([(r.name, p, r.te_multiplier, r.unet_multiplier) for r, (_, p) in zip(requests, adapter_files)])
    columns = [latents, generate(False, "converted", with_converted), generate(False, "copied", copied)]
    images = [to_uint8_images(vae.decode(c, scale=target.latent_scale)) for c in columns]
    labels = [f"Delta Sampling, {first.name}", f"converted: {converted.stem}", f"copied: {first.name}"]
    text = format_parameters(prompts.target[0], prompts.target_negative[0], {**params, "Seed": seeds[0]})
    return write_png(outputs.grid, labelled_grid(images, labels), text,
                     text={"Delta comparison": " | ".join(labels)}, overwrite=outputs.overwrite)


def _short(path: Path, n: int = 10) -> str:
    return hashcache.sha256(path)[:n]


def _infotext(args, settings: DeltaSettings, sampler, schedule, steps: int, adapter_files) -> dict[str, object]:
    """The A1111 `parameters` fields (order as `processing.create_infotext`), Delta Sampling keys included."""
    extra = {SOURCE_HASH: _short(args.source)}
    if args.adapted:
        extra[ADAPTED_HASH] = _short(args.adapted)
    if args.control:
        extra[CONTROL_HASH] = _short(args.control)
    if args.ip_adapter:
        extra[IP_HASH] = _short(args.ip_adapter)
    if adapter_files:
        from ..engine.infotext import format_hashes
        extra[ADAPTER_HASHES] = format_hashes({name: hashcache.addnet(path)[:12] for name, path in adapter_files})
    params: dict[str, object] = {
        "Steps": steps, "Sampler": sampler.name, "Schedule type": infotext_schedule(schedule, sampler),
        "CFG scale": args.cfg, "Seed": None, "Size": f"{args.width}x{args.height}",
        "Model hash": _short(args.target), "Model": args.target.stem,
    }
    if args.vae:
        params.update({"VAE hash": _short(args.vae), "VAE": args.vae.name})
    params.update(settings_to_infotext(settings, extra=extra))
    params.pop(field("hires").infotext, None)  # the runner has no hires pass: claim nothing about one
    params["Version"] = f"lib_deltasampling {__version__}"
    return params


def _write_images(vae, target: SourceModel, latents: torch.Tensor, prompts: Prompts, seeds: list[int],
                  params: dict[str, object], paths: list[Path], overwrite: bool) -> list[Path]:
    images = to_uint8_images(vae.decode(latents, scale=target.latent_scale))
    for i, (image, path) in enumerate(zip(images, paths)):
        text = format_parameters(prompts.target[i], prompts.target_negative[i], {**params, "Seed": seeds[i]})
        write_png(path, image, text, overwrite=overwrite)
    return paths
