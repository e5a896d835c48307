"""What `scripts/delta_sampling.py` delegates to: process, each sampling pass, postprocess.

- `process`: read the settings (UI positional args, the API's [dict] form, X/Y/Z overrides on `p`),
  load the source pair (cached), resolve adapters and embeddings. Nothing runs while DS is off.
- `process_before_every_sampling` (once per pass; twice with hires fix): prepare the engine for this
  pass (its prompts, size, noise, mask) and install the CFG callbacks of that pass.
- `postprocess`: remove every callback; free models per the settings page.
A1111 swallows exceptions raised in script hooks and callbacks and goes on. Delta Sampling must
never leave an image that claims a delta it did not get, so every failure goes through `fail`: it
removes the hooks and the infotext keys, stops the generation (`state.interrupt()`) and says why
in the console and in the image info (`p.comment`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..engine.infotext import (ADAPTED_HASH, ADAPTER_HASHES, CONTROL_HASH, IP_HASH, SOURCE_HASH, format_hashes,
                               settings_to_infotext)
from ..engine.sampler import DeltaSampler, SourceStats
from ..engine.schedule import never_applies
from ..engine.settings import DeltaSettings
from ..errors import SettingError, UserError
from ..runtime.adapters.tags import adapter_requests
from ..runtime.control import SourceControl
from ..runtime.controlnet import load_controlnet
from ..runtime.pair import SourcePair
from ..runtime.text.embeddings import EmbeddingLibrary
from ..runtime.text.prompt import extract_extra_networks
from . import files, hashes, host
from .args import apply_overrides, overrides_from_p, settings_from_script_args
from .hooks_cfg import InitialLatent, PassHook
from .options import read_options
from .preprocessors import host_preprocessors
from .state import CACHE

log = logging.getLogger("delta-sampling")
RUN_ATTR = "delta_sampling_run"


@dataclass
class Run:
    """Delta Sampling state of one generation (one `process_images` call), kept on `p`."""

    settings: DeltaSettings
    pair: SourcePair
    library: EmbeddingLibrary | None
    infotext: dict[str, str]
    hook: PassHook | None = None
    pass_noise: object = None  # the noise of the pass the hook serves (Forge calls the hires one twice)
    failed: bool = False
    infotext_written: bool = False  # run.infotext went into p.extra_generation_params
    stats: SourceStats = field(default_factory=SourceStats)  # the source's runs over every pass
    control: SourceControl | None = None   # the ControlNet on the adapted branch

    def close(self) -> None:
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook.remove()
        self.pass_noise = None


SHORT_MEMORY_BYTES = 2 * 1024 ** 3


def memory_short(placement) -> bool:
    """Less than 2 GiB free on the source models' CUDA device (once per generation, not per step)."""
    if placement.device.type != "cuda":
        return False
    return host.free_bytes(placement.device) < SHORT_MEMORY_BYTES


def load_estimate(path, placement) -> int:
    """Bytes a checkpoint takes once loaded: its file size, twice that in fp32 (files are mostly fp16),
    about half with fp8 UNet weights (the UNet is most of a checkpoint)."""
    size = path.stat().st_size * (2 if placement.dtype == torch.float32 else 1)
    return size // 2 if placement.weights is not None else size


def read_settings(p, args) -> DeltaSettings:
    source = "API" if getattr(p, "is_api", False) else "UI"
    # an X/Y/Z axis turns Delta Sampling on for its cell, whatever the accordion says
    return apply_overrides(settings_from_script_args(args, source=source), overrides_from_p(p))


def remove_leftovers(p=None) -> None:
    """Callbacks of an earlier generation that ended by an exception (postprocess never ran)."""
    run = getattr(p, RUN_ATTR, None) if p is not None else None
    if run is not None:
        run.close()
    from modules import script_callbacks
    for kind in ("cfg_denoiser", "cfg_after_cfg"):
        callbacks = script_callbacks.callback_map.get(f"callbacks_{kind}", [])
        for c in list(callbacks):
            owner = getattr(c.callback, "__self__", None)
            if isinstance(owner, PassHook):
                owner.remove()


def process(p, *args) -> None:
    remove_leftovers()
    try:
        settings = read_settings(p, args)
    except UserError as exc:
        fail(p, exc)
        return
    options = read_options()
    if not settings.enabled:
        CACHE.release_all()  # off: nothing stays loaded (and nothing loads)
        return
    if never_applies(pass_steps(p, settings), settings.scale, settings.start, settings.end, settings.schedule):
        # scale 0 (or a window holding no step) is off too, but keeps what is loaded: a grid over
        # the scale 0, 1, 2 must not reload the source per cell
        log.debug("Delta Sampling: the weight is 0 at every step (scale %s, window %s..%s): not run",
                  settings.scale, settings.start, settings.end)
        return
    try:
        host.check_target(p.sd_model)  # before anything loads: no shape error mid-way on Flux & co.
        setattr(p, RUN_ATTR, prepare_run(p, settings, options))
    except Exception as exc:  # noqa: BLE001 - A1111 would swallow it; fail() stops the run instead
        fail(p, exc)


def pass_steps(p, settings: DeltaSettings) -> list[int]:
    """The sampler steps of each pass the delta would see, as A1111 1.10 runs them: txt2img
    `p.steps`; img2img `t_enc + 1` (`sd_samplers_common.setup_img2img_steps`, what `launch_sampling`
    gets); the hires pass `hr_second_pass_steps or steps` (its img2img call with explicit steps)."""
    from modules import sd_samplers_common

    if getattr(p, "init_images", None) is not None and hasattr(p, "denoising_strength"):
        _, t_enc = sd_samplers_common.setup_img2img_steps(p)
        counts = [t_enc + 1]
    else:
        counts = [p.steps]
    if settings.hires and getattr(p, "enable_hr", False):
        counts.append(getattr(p, "hr_second_pass_steps", 0) or p.steps)
    return counts


def prepare_run(p, settings: DeltaSettings, options) -> Run:
    from modules import shared

    if not settings.source_checkpoint:
        raise SettingError('Delta Sampling "Source base checkpoint"', "no source checkpoint is chosen",
                           "Pick the base model your LoRA or fine-tune was made for")
    if (problem := settings.control_problem()) is not None:
        raise problem
    control_path = files.model_file("controlnet", settings.control_model) if settings.control_model else None
    ip_paths = ((files.model_file("ipadapter", settings.ip_adapter), files.model_file("clipvision", settings.ip_encoder))
                if settings.ip_adapter else None)
    source_path = files.checkpoint_file(settings.source_checkpoint, 'Delta Sampling "Source base checkpoint"')
    adapted_path = (files.checkpoint_file(settings.adapted_checkpoint, 'Delta Sampling "Adapted checkpoint"')
                    if settings.adapted_checkpoint else None)
    _, requests = adapter_requests(settings.adapters)
    adapter_files = tuple((r.name, files.adapter_file(r.name), r.te_multiplier, r.unet_multiplier) for r in requests)

    placement = options.placement()
    host_checkpoint = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "filename", None)
    if CACHE.host_checkpoint not in (None, host_checkpoint) and (options.free_on_checkpoint_change
                                                                 or memory_short(placement)):
        CACHE.release_all()  # the host loaded another model: make room before loading ours again
    CACHE.host_checkpoint = host_checkpoint

    tokenizer = CACHE.tokenizer(options.vocab_paths(), options.webui_root())
    timestep_mode = host.detect().timestep_mode  # sigma -> t for the source as the host does for its UNet
    for path in (source_path, adapted_path):
        if path is not None and not CACHE.has_model(path, placement, timestep_mode):
            host.make_room(placement.device, load_estimate(path, placement))
    base = CACHE.model(source_path, placement, tokenizer, timestep_mode)
    adapted = CACHE.model(adapted_path, placement, tokenizer, timestep_mode) if adapted_path else None
    CACHE.keep_only([m for m in (base, adapted) if m is not None])
    for model in (m for m in (base, adapted) if m is not None):
        if model.placement != placement:  # on the CPU since the last generation (low VRAM)
            host.make_room(placement.device, model.nbytes())
            model.to(placement)
    adapters = CACHE.adapters(adapted or base, adapter_files, source_path.name)
    try:
        image_prompt, control = _extras(settings, base, adapted, placement, control_path, ip_paths)
    except BaseException:
        CACHE.release_extra()   # a ControlNet or IP-Adapter that was refused does not stay loaded
        raise
    pair = SourcePair(base, adapters, adapted, image_prompt)
    dirs = files.embedding_dirs()
    library = EmbeddingLibrary.for_text_stack(dirs, base.text) if dirs else None

    extra = {SOURCE_HASH: hashes.checkpoint_hash(settings.source_checkpoint, source_path)}
    if adapted_path:
        extra[ADAPTED_HASH] = hashes.checkpoint_hash(settings.adapted_checkpoint, adapted_path)
    if adapter_files:
        adapter_hashes = {n: hashes.adapter_hash(n, path) for n, path, _, _ in adapter_files}
        if all(adapter_hashes.values()):
            extra[ADAPTER_HASHES] = format_hashes(adapter_hashes)
    if control_path is not None:
        extra[CONTROL_HASH] = hashes.extra_hash("controlnet", control_path)
    if ip_paths is not None:
        extra[IP_HASH] = hashes.extra_hash("ipadapter", ip_paths[0])
    extra = {k: v for k, v in extra.items() if v}  # --no-hashing: no key rather than hashing
    return Run(settings, pair, library, settings_to_infotext(settings, extra=extra), control=control)


def _extras(settings: DeltaSettings, base, adapted, placement, control_path, ip_paths) -> tuple:
    """(ImagePromptHooks or None, SourceControl or None): the IP-Adapter and ControlNet of these
    settings from the cache (loaded when new), checked against the source; unused kinds freed."""
    image_prompt = control = None
    if ip_paths is not None:
        from ..runtime.clip_vision import load_clip_vision
        from ..runtime.ipadapter import load_ip_adapter
        ip = CACHE.extra("ipadapter", ip_paths[0], placement,
                         lambda: load_ip_adapter(ip_paths[0], device=placement.device, dtype=placement.dtype))
        encoder = CACHE.extra("clipvision", ip_paths[1], placement,
                              lambda: load_clip_vision(ip_paths[1], device=placement.device, dtype=placement.dtype))
        image_prompt = settings.to_image_prompt(ip, encoder, (adapted or base).unet)
    else:
        CACHE.release_extra("ipadapter")
        CACHE.release_extra("clipvision")
    if control_path is not None:
        net = CACHE.extra("controlnet", control_path, placement,
                          lambda: load_controlnet(control_path, device=placement.device, dtype=placement.dtype,
                                                  for_family=base.family))
        control = settings.to_control(net, host_preprocessors())
        control.check(base)
    else:
        CACHE.release_extra("controlnet")
    return image_prompt, control


def _pass_prompts(p, run: Run) -> tuple[list[str], list[str], list[str], list[str]]:
    """(base, base negative, adapted, adapted negative) for this pass's images."""
    s = run.settings
    hires = getattr(p, "is_hr_pass", False)
    prompts = list(getattr(p, "hr_prompts", None) or p.prompts) if hires else list(p.prompts)
    negatives = list(getattr(p, "hr_negative_prompts", None) or p.negative_prompts) if hires else list(p.negative_prompts)
    if s.source_prompt:
        prompts = [extract_extra_networks(s.source_prompt)[0]] * len(prompts)
    if s.source_negative:
        negatives = [extract_extra_networks(s.source_negative)[0]] * len(negatives)
    words = " ".join(adapter_requests(s.adapters)[0].split())
    adapted = [f"{t}, {words}" if t and words else (t or words) for t in prompts]
    return prompts, negatives, adapted, negatives


def before_sampling(p, *args, x=None, noise=None, **kwargs) -> None:
    """One sampling pass starts (first pass, or the hires pass): prepare the engine, install the hooks."""
    run: Run | None = getattr(p, RUN_ATTR, None)
    if run is None or run.failed:
        return
    hires = getattr(p, "is_hr_pass", False)
    if run.hook is not None and noise is not None and run.pass_noise is noise:
        # the same pass again (Forge calls the hires pass's hook twice, with the same noise tensor;
        # held here, so no later tensor can take its id): already prepared
        return
    run.close()  # the previous pass's callbacks never serve this one
    if hires and not run.settings.hires:
        return
    try:
        from modules import shared

        target = p.sd_model
        prompts, negatives, adapted, adapted_negatives = _pass_prompts(p, run)
        embeddings = run.library.for_prompt(prompts, strict=False) if run.library else {}
        adapted_embeddings = run.library.for_prompt(adapted, strict=False) if run.library else {}
        steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else p.steps
        cfg = getattr(p, "hr_cfg", p.cfg_scale) if hires else p.cfg_scale
        schedule = run.pair.base.denoiser.schedule
        c0, sigma0 = 1.0, 1.0  # img2img and hires: the noise enters as sigma * n
        if not hires and getattr(p, "init_latent", None) is None and getattr(shared.opts, "sgm_noise_multiplier", False):
            sigma0 = schedule.sigma_max
            c0 = math.sqrt(1.0 + sigma0 ** 2)
        mask = None if hires else getattr(p, "nmask", None)
        options = read_options()
        low_vram = options.low_vram_now()
        if low_vram:
            run.pair.text_to(run.pair.base.placement.device)
        sampler = DeltaSampler.prepare(
            run.pair, run.settings.to_params(), prompts=prompts, negative_prompts=negatives,
            adapted_prompts=adapted, adapted_negative_prompts=adapted_negatives, steps=steps, cfg_scale=cfg,
            target_scale=host.target_latent_scale(target), noise=noise, noise_multiplier=c0,
            sigma0=sigma0, embeddings=embeddings, adapted_embeddings=adapted_embeddings, generate_mask=mask,
            should_stop=lambda: bool(shared.state.interrupted or shared.state.skipped), stats=run.stats,
            cuda_graphs=options.cuda_graphs, control=run.control)
        if low_vram:
            run.pair.text_to(torch.device("cpu"))  # encoded for this pass: the text encoders are not needed now
        img2img = x is not None and x is not noise  # txt2img hands the noise itself as x
        extra = float(getattr(shared.opts, "img2img_extra_noise", 0) or 0) if img2img else 0.0
        start = InitialLatent(noise, x if img2img else None, extra) if noise is not None else None
        run.hook = PassHook(sampler, schedule, on_error=lambda exc: fail(p, exc), start=start)
        run.hook.install()
        run.pass_noise = noise
        p.extra_generation_params.update(run.infotext)
        run.infotext_written = True
    except Exception as exc:  # noqa: BLE001
        fail(p, exc)


def summary(run: Run) -> str:
    """The one console line of a generation with the delta applied."""
    s = run.settings
    parts = [f"source {s.source_checkpoint}"]
    if s.adapted_checkpoint:
        parts.append(f"adapted {s.adapted_checkpoint}")
    if s.adapters.strip():
        parts.append(f"adapters {s.adapters.strip()}")
    parts += [f"scale {s.scale:g}", f"guidance {s.guidance}"]
    return (f"Delta Sampling: {', '.join(parts)}; {run.stats.forwards} source forwards, "
            f"{run.stats.seconds():.2f} s in the source")


def postprocess(p, processed=None, *args) -> None:
    run: Run | None = getattr(p, RUN_ATTR, None)
    if run is not None:
        run.close()
        if run.infotext_written and not run.failed:
            log.info(summary(run))
        setattr(p, RUN_ATTR, None)  # p outlives the generation (API response, X/Y/Z): hold nothing
    remove_leftovers()
    options = read_options()
    if not options.keep_loaded:
        CACHE.release_all()
    elif options.low_vram_now():
        CACHE.offload_all()  # to the CPU until the next generation with Delta Sampling


def fail(p, exc: BaseException) -> None:
    """Stop the generation visibly; leave no hook and no infotext claiming a delta."""
    from ..engine.sampler import GenerationInterrupted
    from modules import shared

    run: Run | None = getattr(p, RUN_ATTR, None)
    if run is not None:
        run.failed = True
        run.close()
    if isinstance(exc, GenerationInterrupted):
        return  # the user pressed Interrupt/Skip: A1111 stops; the steps so far did get the delta
    if run is not None and run.infotext_written:
        for key in run.infotext:
            p.extra_generation_params.pop(key, None)
    if isinstance(exc, UserError):
        message = f"Delta Sampling stopped the generation: {exc}"
        log.error(message)
    else:
        message = f"Delta Sampling stopped the generation after an internal error: {exc.__class__.__name__}: {exc}"
        log.error(message, exc_info=exc)
    if hasattr(p, "comment"):
        p.comment(message)
    shared.state.interrupt()


def ui(script, is_img2img: bool) -> list:
    """The accordion's components, in FIELDS order (= the positional script args). Loads nothing."""
    from .api import adapter_choices
    from .ui import UiChoices, build_ui
    return build_ui(script, is_img2img, UiChoices(checkpoints=files.checkpoint_titles, loras=adapter_choices))
