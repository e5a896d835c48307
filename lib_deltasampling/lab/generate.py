"""Generation in the miniature world through the runner's own parts: `load_model`, `AdapterSet`,
`SourcePair`, `DeltaSampler`, the runner's samplers, sigmas and seeds, and the VAE decoder.

    lab = Lab(folder)
    images = generate(lab, "sdxl", prompts, seeds)                                    # the target alone
    images = generate(lab, "sdxl", prompts, seeds, transfer=Transfer("sd1", "style", scale=3))   # Delta Sampling
    images = generate(lab, "sdxl", prompts, seeds, target_lora="style")              # the oracle LoRA
    images = firstpass(lab, "sdxl", prompts, seeds, source="sd1", lora="style", strength=0.6)    # baseline
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.sampler import DeltaSampler
from ..engine.settings import DeltaSettings
from ..runner.generate import cfg_conditioning
from ..runner.sampling import ImageNoise, get_sigmas, initial_noise_multiplier, latent_shape, parse_sampler
from ..runtime.adapters.apply import AdapterSet
from ..runtime.checkpoint import open_store
from ..runtime.detect import Family
from ..runtime.model import SourceModel, load_model
from ..runtime.pair import SourcePair
from ..runtime.placement import Placement
from ..runtime.vae import VaeDecoder, load_vae_decoder, to_uint8_images
from . import minis

from . import DEFAULT_FOLDER


class Lab:
    """The trained miniature models of one folder, each loaded once, on one device."""

    def __init__(self, folder: Path = DEFAULT_FOLDER, device: str = "cpu", vocab: str | None = None) -> None:
        from ..runtime.text.tokenizer import ClipTokenizer
        self.folder = Path(folder)
        self.placement = Placement(torch.device(device), torch.float32)
        self.tokenizer = ClipTokenizer.find([vocab] if vocab else [], configure="--vocab")
        self._models: dict[str, SourceModel] = {}
        self._vaes: dict[str, VaeDecoder] = {}
        self._encoders: dict[str, minis.AutoencoderKL] = {}
        self._classifier = None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def lora_path(self, kind: str, base: str) -> Path:
        return self.folder / "lora" / f"{kind}-{base}.safetensors"

    def model(self, name: str) -> SourceModel:
        if name not in self._models:
            self._models[name] = load_model(self.path(name), placement=self.placement, tokenizer=self.tokenizer)
        return self._models[name]

    def vae(self, name: str) -> VaeDecoder:
        if name not in self._vaes:
            self._vaes[name] = load_vae_decoder(open_store(self.path(name)), self.placement.device)
        return self._vaes[name]

    def autoencoder(self, name: str) -> minis.AutoencoderKL:
        """The checkpoint's whole VAE, encoder included (for the img2img baseline)."""
        if name not in self._encoders:
            store = open_store(self.path(name)).sub("first_stage_model.")
            vae = minis.AutoencoderKL(minis.SPECS[name].vae)
            vae.load_ldm({k: store.tensor(k).float() for k in store.keys()})
            self._encoders[name] = vae.to(self.placement.device).eval()
        return self._encoders[name]

    def classifier(self):
        if self._classifier is None:
            from safetensors.torch import load_file

            from .metrics import Classifier
            net = Classifier()
            net.load_state_dict({k: v.float() for k, v in load_file(str(self.folder / "classifier.safetensors")).items()})
            self._classifier = net.to(self.placement.device).eval()
        return self._classifier

    def adapters(self, model: str, kind: str, lora_base: str) -> AdapterSet:
        m = self.model(model)
        adapters = AdapterSet(m.components(), m.family, source_name=self.path(model).name)
        adapters.add(self.lora_path(kind, lora_base), name=f"{kind}-{lora_base}")
        return adapters


@dataclass(frozen=True)
class Transfer:
    """Delta Sampling from `source` + its `lora` LoRA; `settings`: DeltaSettings fields (scale, start,
    end, schedule, guidance, reuse, source_cfg)."""

    source: str
    lora: str
    settings: dict = field(default_factory=dict)

    def __init__(self, source: str, lora: str, **settings) -> None:
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "lora", lora)
        object.__setattr__(self, "settings", settings)


def _sample(lab: Lab, target: SourceModel, cond: dict, prompts: list[str], negatives: list[str], seeds: list[int],
            *, steps: int, cfg: float, sampler_name: str, transfer: Transfer | None,
            init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    sampler, schedule = parse_sampler(sampler_name, None)
    sigmas = get_sigmas(schedule, steps, target.denoiser.schedule, sampler=sampler, sdxl=target.family is Family.SDXL)
    c0 = initial_noise_multiplier(sigmas)
    device = lab.placement.device
    noise_source = ImageNoise(seeds, latent_shape(minis.IMAGE_SIZE, minis.IMAGE_SIZE), device)
    noise = noise_source.first()
    first = 0
    if init is not None:                         # img2img: start part-way with the init latent plus noise
        first = steps - int(round(steps * strength))
        sigmas = sigmas[first:]
    delta = None
    if transfer is not None:
        source = lab.model(transfer.source)
        pair = SourcePair(source, lab.adapters(transfer.source, transfer.lora, transfer.source))
        settings = DeltaSettings(enabled=True, source_checkpoint=transfer.source,
                                 adapters=f"<lora:{transfer.lora}-{transfer.source}:1>", **transfer.settings)
        delta = DeltaSampler.prepare(pair, settings.to_params(), prompts=prompts, negative_prompts=negatives,
                                     adapted_prompts=prompts, adapted_negative_prompts=negatives, steps=len(sigmas) - 1,
                                     cfg_scale=cfg, target_scale=target.latent_scale, noise=noise, noise_multiplier=c0,
                                     sigma0=float(sigmas[0]), cuda_graphs=False)
    n = len(sigmas) - 1

    def model(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        both = target.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), cond)
        uncond, c = both.chunk(2)
        denoised = uncond + cfg * (c - uncond)
        return delta(x, sigma, step, n, denoised) if delta is not None else denoised

    x = noise * (float(sigmas[0]) if init is not None else c0)
    if init is not None:
        x = init + x
    with torch.inference_mode(), (delta.running() if delta else nullcontext()):
        return sampler(model, x, sigmas.to(device), noise_sampler=noise_source.noise_sampler())


def generate(lab: Lab, target: str, prompts: list[str], seeds: list[int], *, steps: int = 20, cfg: float = 5.0,
             sampler: str = "Euler", transfer: Transfer | None = None, target_lora: str | None = None,
             negative: str = "", init: torch.Tensor | None = None, strength: float = 1.0) -> np.ndarray:
    """uint8 images [B, 64, 64, 3] for prompts[i] with seeds[i]. `target_lora`: a LoRA kind trained on
    `target` itself (the oracle), applied to its UNet. `init`: img2img from these target latents."""
    m = lab.model(target)
    negatives = [negative] * len(prompts)
    with (lab.adapters(target, target_lora, target).applied() if target_lora else nullcontext()):
        cond = cfg_conditioning(m, prompts, negatives, minis.IMAGE_SIZE, minis.IMAGE_SIZE)
        latents = _sample(lab, m, cond, prompts, negatives, seeds, steps=steps, cfg=cfg, sampler_name=sampler,
                          transfer=transfer, init=init, strength=strength)
    return decode(lab, target, latents)


def decode(lab: Lab, model: str, latents: torch.Tensor) -> np.ndarray:
    return to_uint8_images(lab.vae(model).decode(latents, scale=lab.model(model).latent_scale, rows_per_call=64))


@torch.no_grad()
def firstpass(lab: Lab, target: str, prompts: list[str], seeds: list[int], *, source: str, lora: str,
              strength: float, steps: int = 20, cfg: float = 5.0, sampler: str = "Euler") -> np.ndarray:
    """The naive baseline (old-sd-firstpasser): the source with its LoRA makes the image, the target
    re-draws it by img2img at denoising `strength` (its VAE encodes the first pass's pixels)."""
    first = generate(lab, source, prompts, seeds, steps=steps, cfg=cfg, sampler=sampler, target_lora=lora)
    mean, _ = lab.autoencoder(target).moments(minis.pixels(first, lab.placement.device))
    init = mean * lab.model(target).latent_scale
    return generate(lab, target, prompts, seeds, steps=steps, cfg=cfg, sampler=sampler, init=init, strength=strength)
