"""A loaded source model: UNet + text encoders + denoiser, placed on one device.

    model = load_model("sd15.safetensors", placement=choose_placement("cuda", "fp16"))
    cond = model.encode(["a cat"], width=512, height=512)
    x0 = model.denoise(x, sigma, cond)          # k-diffusion convention: x = x0 + sigma * noise
    model.release()                             # frees every weight; the object is unusable after

The file is read once; weights go straight from the memory-mapped file to the target
device and dtype. `to()` moves a loaded model (e.g. offload to CPU between generations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import TensorStore, open_store
from .denoiser import DiscreteSchedule, Denoiser, Prediction, latent_scale_factor
from .detect import UNET_PREFIX, Family, ModelInfo, detect_model
from .fp8 import move_module, store_fp8
from .placement import Placement, choose_placement, empty_device_caches, module_nbytes, release_module
from .text.encode import Conditioning, EmbeddingVectors, TextStack, load_text_stack, sdxl_adm_vector
from .text.tokenizer import ClipTokenizer
from .unet import UNetModel, load_unet

Cond = dict[str, torch.Tensor]


@dataclass
class SourceModel:
    info: ModelInfo
    unet: UNetModel
    text: TextStack
    denoiser: Denoiser
    placement: Placement
    released: bool = field(default=False, init=False)

    @property
    def family(self) -> Family:
        return self.info.family

    @property
    def prediction(self) -> str:
        return self.denoiser.prediction.value

    @property
    def latent_scale(self) -> float:
        """Factor between VAE latents and the model's latent space (SD1/SD2 0.18215, SDXL 0.13025)."""
        return latent_scale_factor(self.family.value)

    def encode(self, prompts: Sequence[str], *, width: int, height: int, negative: bool = False,
               embeddings: Mapping[str, EmbeddingVectors] = {}) -> Cond:
        """Conditioning for the UNet: `context`, and for SDXL the `y` vector built for this image size."""
        return self.cond_from(self.text.encode(prompts, embeddings, negative=negative), width=width, height=height)

    def cond_from(self, conditioning: Conditioning, *, width: int, height: int) -> Cond:
        """UNet inputs from encoded text: `context`, plus SDXL's `y` (pooled + size embeddings)."""
        out: Cond = {"context": conditioning.context.to(self.placement.dtype)}
        if self.family is Family.SDXL:
            out["y"] = sdxl_adm_vector(conditioning.pooled, width, height).to(self.placement.dtype)
        return out

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, control=None) -> torch.Tensor:
        """`control`: the UNet's ControlNet argument for this forward (runtime/control.py `RowControl`)."""
        if control is None:
            return self.denoiser(x, sigma, **cond)
        return self.denoiser(x, sigma, **cond, control=control)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, *(enc.model for enc in self.text.encoders)]

    def components(self) -> dict[str, torch.nn.Module]:
        """The parts adapters address: "unet", "te1" (SD1/SD2 encoder, SDXL CLIP-L), "te2" (SDXL bigG)."""
        return {"unet": self.unet, **{f"te{i + 1}": enc.model for i, enc in enumerate(self.text.encoders)}}

    def nbytes(self) -> int:
        return sum(module_nbytes(m) for m in self.modules())

    def to(self, placement: Placement) -> "SourceModel":
        """Move (and cast) every weight; floating weights take `placement.dtype`."""
        for m in self.modules():
            move_module(m, placement.device, placement.dtype)  # fp8 weights stay fp8
        self.placement = placement
        return self

    def text_to(self, device: torch.device) -> None:
        """Move only the text encoders (low VRAM: they run once per pass, the UNet every step)."""
        for enc in self.text.encoders:
            move_module(enc.model, device, self.placement.dtype)

    def release(self) -> None:
        """Free every weight now (even if something else still references the modules)."""
        if self.released:
            return
        for m in self.modules():
            release_module(m, empty_caches=False)
        self.released = True
        empty_device_caches()  # once for all modules: gc and heap trimming are not free


def probe_v_prediction(unet: UNetModel) -> bool:
    """A1111's SD2 test (`sd_models_config.is_using_v_parameterization_for_sd2`): at t=999 on a
    constant 0.5 latent, a v model predicts about -x (so out - x averages below -1), an eps model noise."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999.0], device=p.device)
    with torch.no_grad():
        out = unet(x, t, context)
    return (out.float() - x.float()).mean().item() < -1  # load time, not the per-step path


def load_model(source: str | Path | TensorStore, *, prediction: str | None = None,
               placement: Placement | None = None, tokenizer: ClipTokenizer | None = None,
               vocab_paths: Sequence[str | Path] = (), clip_skip: int = 1,
               timestep_mode: str = "interpolate") -> SourceModel:
    """Load a single-file SD1.x / SD2.x / SDXL checkpoint as a source model.

    `prediction`: None/"auto" (yaml beside the file, `v_pred` key, SD2 probe), "eps" or "v".
    `placement`: device and dtype (default: `choose_placement()`: CUDA fp16, MPS fp16, else CPU fp32).
    `tokenizer`: a ready `ClipTokenizer`; else the vocabulary is searched (`find_vocab`) with
    `vocab_paths` first. `timestep_mode`: "interpolate" (A1111) or "nearest" (Forge, reForge).
    """
    store = source if isinstance(source, TensorStore) else open_store(source)
    info = detect_model(store, prediction=prediction)
    placement = placement or choose_placement()
    tokenizer = tokenizer or ClipTokenizer.find(vocab_paths)

    unet = load_unet(store.sub(UNET_PREFIX), info.unet, placement.device, placement.dtype)
    if placement.weights is not None:
        store_fp8(unet)
    try:
        text = load_text_stack(store, info.family.value, tokenizer, placement.device, placement.dtype,
                               clip_skip=clip_skip)
    except BaseException:
        release_module(unet)  # no half-loaded model stays on the device
        raise
    pred = info.prediction
    if pred is None:
        pred = "v" if probe_v_prediction(unet) else "eps"
        info = ModelInfo(info.path, info.family, pred, "probe", info.unet, info.has_vae)
    denoiser = Denoiser(unet, Prediction(pred), DiscreteSchedule(), timestep_mode=timestep_mode,
                        net_dtype=placement.dtype)
    return SourceModel(info, unet, text, denoiser, placement)
