"""What differs between the WebUIs Delta Sampling runs in, in one place.

Hosts are told apart by what they have imported, never by version strings:
- Forge and Forge Neo: the Forge2 `backend` package (`backend.sampling.sampling_function`, imported
  by their `modules/sd_samplers_cfg_denoiser.py`); the two behave alike for everything here.
- reForge and Forge Classic: the ComfyUI-style `ldm_patched` backend.
- AUTOMATIC1111: neither.

All of them keep A1111's CFG-denoiser callbacks (`on_cfg_denoiser`, `on_cfg_after_cfg`), which is the
one sampling hook used everywhere (`hooks_cfg.py`); what they hand to it differs and is read from the
denoiser itself (`hooks_cfg.hands_timesteps`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import UserError

A1111, FORGE, REFORGE = "a1111", "forge", "reforge"

# latent channels of the target models the delta can be added to (SD1.x, SD2.x, SDXL and their
# fine-tunes: Pony, Illustrious, NoobAI...): the source's 4-channel SD latent, same VAE family
DELTA_LATENT_CHANNELS = 4


@dataclass(frozen=True)
class Host:
    kind: str              # A1111, FORGE (Forge, Forge Neo) or REFORGE (reForge, Forge Classic)
    timestep_mode: str     # how the source UNet maps sigma -> t, as the host does for its own UNet

    @property
    def forge2(self) -> bool:
        return self.kind == FORGE


def detect(modules: dict | None = None) -> Host:
    """The running host, from the modules it has imported (sys.modules by default)."""
    loaded = sys.modules if modules is None else modules
    if "backend.sampling.sampling_function" in loaded:
        # Forge2's predictor maps sigma to the nearest training timestep
        # (backend/modules/k_prediction.py Prediction.timestep: argmin |log sigma - log sigmas|)
        return Host(FORGE, "nearest")
    if "ldm_patched" in loaded:
        # reForge runs its UNet through ldm_patched's sampling_function: ModelSamplingDiscrete.timestep
        # is the same argmin (ldm_patched/modules/model_sampling.py)
        return Host(REFORGE, "nearest")
    return Host(A1111, "interpolate")  # k_diffusion.external.DiscreteSchedule.sigma_to_t


def target_latent_scale(sd_model) -> float:
    """The host model's latent scale factor: ldm/sgm `scale_factor` (A1111, reForge), Forge's VAE
    `scaling_factor` (backend/nn/vae.py IntegratedAutoencoderKL.process_in), Forge Neo's VAE
    `latent_format.scale_factor` (Neo has no `scaling_factor`: backend/nn/_vae.py ProcessLatent, set in
    diffusion_engine/base.py), else by model type."""
    scale = getattr(sd_model, "scale_factor", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    vae = getattr(getattr(getattr(sd_model, "forge_objects", None), "vae", None), "first_stage_model", None)
    neo_format = getattr(vae, "latent_format", None)
    for scale in (getattr(vae, "scaling_factor", None), getattr(neo_format, "scale_factor", None)):
        if isinstance(scale, (int, float)):
            return float(scale)
    return 0.13025 if getattr(sd_model, "is_sdxl", False) else 0.18215


def target_latent_channels(sd_model) -> int:
    """Latent channels of the host model: Forge2 VAE patcher `latent_channels` (backend/patcher/vae.py),
    A1111's `sd_model.latent_channels` (4 by sd_models.set_model_fields, 16 for SD3), else 4. Never the
    UNet's in_channels (9 for inpainting UNets, which still denoise 4)."""
    vae = getattr(getattr(sd_model, "forge_objects", None), "vae", None)
    channels = getattr(vae, "latent_channels", None)
    if isinstance(channels, int):
        return channels
    channels = getattr(sd_model, "latent_channels", None)
    return channels if isinstance(channels, int) else DELTA_LATENT_CHANNELS


def target_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "title", None) or getattr(info, "name", None)
    return str(name or type(sd_model).__name__)


def target_prediction(sd_model) -> str | None:
    """Forge2's prediction type of the host UNet ('epsilon', 'v_prediction', 'edm', 'const' = flow);
    None elsewhere (A1111 and reForge run SD models through k-diffusion's VE sigmas)."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    kind = getattr(predictor, "prediction_type", None)
    return kind if isinstance(kind, str) else None


def check_target(sd_model) -> None:
    """Refuse, before anything loads or samples, a host model whose latent the SD source's delta
    cannot be added to: Flux, Chroma, SD3/3.5, Wan, Qwen-Image and the other 16-channel (or video)
    latents of Forge Neo. Forge2 marks SD1/SD2/SDXL/SD3 as `is_webui_legacy_model()`; SD3 has
    16 channels, so the channel count decides."""
    channels = target_latent_channels(sd_model)
    legacy = getattr(sd_model, "is_webui_legacy_model", None)
    if channels != DELTA_LATENT_CHANNELS or (callable(legacy) and not legacy()):
        kind = type(sd_model).__name__
        raise UserError(f"the WebUI's checkpoint '{target_name(sd_model)}'",
                        f"is a {kind} model with {channels}-channel latents; Delta Sampling adds an "
                        "SD1.x/SD2.x/SDXL source's 4-channel prediction and cannot be combined with it",
                        "Pick an SD1.x, SD2.x or SDXL-based checkpoint (Pony, Illustrious, NoobAI...), "
                        "or turn Delta Sampling off for this model")
    if target_prediction(sd_model) == "const":
        # flow matching (Forge Neo's rectified-flow SDXL): sigma is a flow time, x = (1 - s) x0 + s n
        raise UserError(f"the WebUI's checkpoint '{target_name(sd_model)}'",
                        "is a flow-matching (rectified flow) model; Delta Sampling's source predicts on the "
                        "SD noise schedule and cannot be combined with it",
                        "Pick an epsilon- or v-prediction SD1.x/SD2.x/SDXL checkpoint, or turn Delta Sampling off")


def _forge_memory():
    """Forge2's memory manager (`backend/memory_management.py`), or None in other hosts."""
    return sys.modules.get("backend.memory_management") if detect().forge2 else None


def free_bytes(device) -> int:
    """Free memory on a CUDA device as the host counts it: Forge2's `get_free_memory(dev)` (device free
    plus torch's reserved-but-unused cache; same signature in Forge and Neo), else torch's own."""
    memory = _forge_memory()
    if memory is not None:
        return int(memory.get_free_memory(device))
    import torch
    return int(torch.cuda.mem_get_info(device)[0])


def make_room(device, needed: int) -> None:
    """Before source weights load onto a CUDA device (in `process`, never mid-step): on Forge2 ask the
    host's memory manager to offload its own idle models until `needed` bytes are free
    (`free_memory(memory_required, device)`, positional in Forge and Neo, whose keyword sets differ).
    A1111 and reForge keep their models where they are."""
    memory = _forge_memory()
    if memory is not None and getattr(device, "type", None) == "cuda":
        memory.free_memory(needed, device)
