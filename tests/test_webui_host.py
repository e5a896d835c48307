"""webui/host.py: host detection, the target's latent scale and channels, and the refusal of targets the
delta cannot be added to. The fakes carry the attribute names and values of the real hosts' objects,
read from their sources (Forge 2.0.1v1.10.1, Forge Neo 2.26, A1111 1.10.1; cited per fake as
file:function); nothing here imports a host."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_deltasampling.errors import UserError
from lib_deltasampling.runtime.denoiser import DiscreteSchedule
from lib_deltasampling.webui import host


# ------------------------------------------------------------------ detect()

def _modules(*names: str) -> dict:
    return {name: types.ModuleType(name) for name in names}


def test_detect_a1111_has_neither_backend():
    """A1111 1.10 imports `modules.*`, `ldm`, `sgm`, `k_diffusion`, but no Forge2 `backend` and no `ldm_patched`."""
    found = host.detect(_modules("modules", "modules.sd_hijack", "modules.sd_samplers_cfg_denoiser", "ldm",
                                 "sgm", "k_diffusion", "k_diffusion.external"))
    assert (found.kind, found.timestep_mode, found.forge2) == (host.A1111, "interpolate", False)


@pytest.mark.parametrize("extra", [("modules.sd_hijack",),                        # Forge 2 keeps a stub sd_hijack
                                   ("modules_forge.packages", "modules_forge.packages.k_diffusion")])  # Neo
def test_detect_forge_and_neo_by_the_backend_sampling_function(extra):
    """Forge and Neo: modules/sd_samplers_cfg_denoiser.py imports `backend.sampling.sampling_function`."""
    found = host.detect(_modules("modules", "modules_forge", "backend", "backend.sampling",
                                 "backend.sampling.sampling_function", *extra))
    assert (found.kind, found.timestep_mode, found.forge2) == (host.FORGE, "nearest", True)


def test_detect_reforge_by_ldm_patched():
    """reForge (and Forge Classic): the ComfyUI-style `ldm_patched` backend next to A1111's ldm/sgm."""
    found = host.detect(_modules("modules", "modules_forge", "ldm", "sgm", "ldm_patched",
                                 "ldm_patched.modules", "ldm_patched.modules.model_sampling"))
    assert (found.kind, found.timestep_mode, found.forge2) == (host.REFORGE, "nearest", False)
    assert host.detect(_modules("ldm_patched")).kind == host.REFORGE


def test_detect_reads_sys_modules_by_default(monkeypatch):
    for name in ("backend.sampling.sampling_function", "ldm_patched", "ldm_patched.modules.model_sampling"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert host.detect().kind == host.A1111
    monkeypatch.setitem(sys.modules, "backend.sampling.sampling_function",
                        types.ModuleType("backend.sampling.sampling_function"))
    assert host.detect().kind == host.FORGE


def _forge_timestep(schedule: DiscreteSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """Forge backend/modules/k_prediction.py Prediction.timestep, verbatim (its KModel.apply_model feeds the
    UNet `predictor.timestep(sigma)`)."""
    log_sigma = sigma.log()
    dists = log_sigma - schedule.log_sigmas[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape)


def _kdiffusion_sigma_to_t(schedule: DiscreteSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """A1111 repositories/k-diffusion/k_diffusion/external.py DiscreteSchedule.sigma_to_t (quantize=False),
    verbatim: what A1111's CompVisDenoiser feeds its UNet."""
    log_sigmas = schedule.log_sigmas
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def test_timestep_mode_maps_sigma_as_the_host_maps_it_for_its_own_unet():
    """The source UNet gets the timestep the host would give its own UNet at the same sigma."""
    schedule = DiscreteSchedule()
    sigma = torch.cat([torch.logspace(-1.5, 1.2, 37), schedule.sigmas[[0, 1, 500, 998, 999]]])
    forge = host.detect(_modules("backend.sampling.sampling_function"))
    reforge = host.detect(_modules("ldm_patched"))  # ldm_patched ModelSamplingDiscrete.timestep: the same argmin
    a1111 = host.detect({})
    assert torch.equal(schedule.sigma_to_t(sigma, forge.timestep_mode), _forge_timestep(schedule, sigma))
    assert torch.equal(schedule.sigma_to_t(sigma, reforge.timestep_mode), _forge_timestep(schedule, sigma))
    assert torch.allclose(schedule.sigma_to_t(sigma, a1111.timestep_mode), _kdiffusion_sigma_to_t(schedule, sigma),
                          atol=1e-4)


# ------------------------------------------------------------------ fakes of the hosts' model objects

class CheckpointInfo:
    """modules/sd_models.py CheckpointInfo.__init__ (Forge, Neo, A1111): name (relative path with extension),
    name_for_extra (file stem), title (`name [shorthash]`)."""

    def __init__(self, filename: str, shorthash: str | None = "0123456789") -> None:
        self.filename = filename
        self.name = filename.rsplit("/", 1)[-1]
        self.name_for_extra = self.name.rsplit(".", 1)[0]
        self.title = self.name if shorthash is None else f"{self.name} [{shorthash}]"


class ForgeAutoencoderKL(torch.nn.Module):
    """Forge backend/nn/vae.py IntegratedAutoencoderKL.__init__: `scaling_factor`/`shift_factor` from the
    VAE's config.json (process_in = (z - shift) * scale)."""

    def __init__(self, latent_channels: int, scaling_factor: float, shift_factor: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor


class LatentFormat:
    """Neo modules_forge/packages/huggingface_guess/latent.py LatentFormat (SD15, SDXL, Flux, SDXL_Flux2)."""

    def __init__(self, scale_factor: float, latent_channels: int = 4) -> None:
        self.scale_factor = scale_factor
        self.latent_channels = latent_channels


class NeoAutoencoderKL(torch.nn.Module):
    """Neo backend/nn/vae.py IntegratedAutoencoderKL(nn.Module, ProcessLatent, ConfigMixin): no
    scaling_factor attribute; `latent_format` is set by diffusion_engine/base.py
    ForgeDiffusionEngine.__init__ (huggingface_components["vae"].latent_format = estimated_config.latent_format)."""

    def __init__(self, latent_channels: int, latent_format: LatentFormat) -> None:
        super().__init__()
        self.embed_dim = latent_channels
        self.latent_format = latent_format


class VAE:
    """backend/patcher/vae.py VAE.__init__ (Forge, Neo): latent_channels (Neo: 32 if is_mugen), first_stage_model."""

    def __init__(self, model, latent_channels: int) -> None:
        self.latent_channels = latent_channels
        self.first_stage_model = model


class Predictor:
    """backend/modules/k_prediction.py AbstractPrediction.__init__: prediction_type in 'epsilon', 'v_prediction',
    'edm' (Forge only), 'const' (flow: PredictionFlux, PredictionDiscreteFlow)."""

    def __init__(self, prediction_type: str) -> None:
        self.prediction_type = prediction_type


class KModel:
    """backend/modules/k_model.py KModel.__init__: self.predictor."""

    def __init__(self, prediction_type: str) -> None:
        self.predictor = Predictor(prediction_type)


class UnetPatcher:
    """backend/patcher/unet.py UnetPatcher (a ModelPatcher): .model is the KModel."""

    def __init__(self, prediction_type: str) -> None:
        self.model = KModel(prediction_type)


class ForgeObjects:
    """backend/diffusion_engine/base.py ForgeObjects(unet, clip, vae, clipvision)."""

    def __init__(self, unet, clip, vae, clipvision) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision


class ForgeDiffusionEngine:
    """Forge backend/diffusion_engine/base.py ForgeDiffusionEngine: fix_for_webui_backward_compatibility sets
    the flags False (first_stage_model/cond_stage_model None); no scale_factor, no latent_channels."""

    def __init__(self, filename: str, vae: VAE, prediction_type: str = "epsilon") -> None:
        self.fix_for_webui_backward_compatibility()
        self.forge_objects = ForgeObjects(UnetPatcher(prediction_type), None, vae, None)
        self.sd_checkpoint_info = CheckpointInfo(filename)  # modules/sd_models.py forge_model_reload

    def is_webui_legacy_model(self):
        return self.is_sd1 or self.is_sd2 or self.is_sdxl or self.is_sd3

    def fix_for_webui_backward_compatibility(self):
        self.tiling_enabled = False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = False
        self.is_sd2 = False
        self.is_sdxl = False
        self.is_sd3 = False


class StableDiffusion(ForgeDiffusionEngine):
    """Forge backend/diffusion_engine/sd15.py: is_sd1; SD1 VAE config.json: 4 channels, scaling 0.18215."""

    def __init__(self, filename="v1-5-pruned-emaonly.safetensors", prediction_type="epsilon"):
        super().__init__(filename, VAE(ForgeAutoencoderKL(4, 0.18215), 4), prediction_type)
        self.is_sd1 = True


class StableDiffusionXL(ForgeDiffusionEngine):
    """Forge backend/diffusion_engine/sdxl.py: is_sdxl; SDXL VAE: 4 channels, scaling 0.13025."""

    def __init__(self, filename="sd_xl_base_1.0.safetensors", prediction_type="epsilon", scaling_factor=0.13025):
        super().__init__(filename, VAE(ForgeAutoencoderKL(4, scaling_factor), 4), prediction_type)
        self.is_sdxl = True


class StableDiffusion3(ForgeDiffusionEngine):
    """Forge backend/diffusion_engine/sd35.py: is_sd3 (so is_webui_legacy_model() is True); 16 channels,
    scaling 1.5305 shift 0.0609; PredictionDiscreteFlow ('const')."""

    def __init__(self, filename="sd3.5_medium.safetensors"):
        super().__init__(filename, VAE(ForgeAutoencoderKL(16, 1.5305, 0.0609), 16), "const")
        self.is_sd3 = True


class Flux(ForgeDiffusionEngine):
    """Forge backend/diffusion_engine/flux.py: no legacy flag (is_webui_legacy_model() False), 16 channels,
    scaling 0.3611 shift 0.1159, PredictionFlux ('const')."""

    def __init__(self, filename="flux1-dev-bnb-nf4-v2.safetensors"):
        super().__init__(filename, VAE(ForgeAutoencoderKL(16, 0.3611, 0.1159), 16), "const")
        self.use_distilled_cfg_scale = True


class NeoForgeDiffusionEngine:
    """Neo backend/diffusion_engine/base.py ForgeDiffusionEngine: flags is_sd1, is_sdxl, is_wan, use_shift
    (no is_sd2/is_sd3); is_webui_legacy_model() = is_sd1 or is_sdxl; first_stage_model is a property."""

    def __init__(self, filename: str, vae: VAE, prediction_type: str = "epsilon") -> None:
        self.fix_for_webui_backward_compatibility()
        self.forge_objects = ForgeObjects(UnetPatcher(prediction_type), None, vae, None)
        self.sd_checkpoint_info = CheckpointInfo(filename)

    def is_webui_legacy_model(self):
        return self.is_sd1 or self.is_sdxl

    def fix_for_webui_backward_compatibility(self):
        self.tiling_enabled = False
        self.use_distilled_cfg_scale = False
        self.use_shift = False
        self.is_sd1 = False
        self.is_sdxl = False
        self.is_wan = False

    @property
    def first_stage_model(self):
        return self.forge_objects.vae.first_stage_model


class NeoStableDiffusion(NeoForgeDiffusionEngine):
    """Neo diffusion_engine/sd15.py: is_sd1; latent.SD15 (0.18215)."""

    def __init__(self, filename="dreamshaper_8.safetensors"):
        super().__init__(filename, VAE(NeoAutoencoderKL(4, LatentFormat(0.18215)), 4))
        self.is_sd1 = True


class NeoStableDiffusionXL(NeoForgeDiffusionEngine):
    """Neo diffusion_engine/sdxl.py: is_sdxl; latent.SDXL (0.13025); with the RF sampling setting the
    predictor is PredictionDiscreteFlow ('const') and use_shift is True."""

    def __init__(self, filename="illustrious_v1.safetensors", rectified_flow=False):
        super().__init__(filename, VAE(NeoAutoencoderKL(4, LatentFormat(0.13025)), 4),
                         "const" if rectified_flow else "epsilon")
        self.use_shift = rectified_flow
        self.is_sdxl = True


class Mugen(NeoForgeDiffusionEngine):
    """Neo diffusion_engine/mugen.py: is_sdxl = True, but VAE(is_mugen=True) has latent_channels = 32
    (patcher/vae.py VAE.__init__), latent.SDXL_Flux2."""

    def __init__(self, filename="mugen_v1.safetensors"):
        super().__init__(filename, VAE(NeoAutoencoderKL(32, LatentFormat(1.0, 32)), 32))
        self.is_sdxl = True


class LatentDiffusion:
    """A1111 ldm LatentDiffusion / sgm DiffusionEngine: a float `scale_factor` (config), flags from
    modules/sd_models.py set_model_type, latent_channels = 4 from set_model_fields; no forge_objects."""

    def __init__(self, filename="v1-5-pruned-emaonly.safetensors", sdxl=False):
        self.scale_factor = 0.13025 if sdxl else 0.18215
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = not sdxl, False, sdxl, False, False
        self.latent_channels = 4
        self.parameterization = "eps"
        self.sd_checkpoint_info = CheckpointInfo(filename)


class SD3Inferencer:
    """A1111 modules/models/sd3/sd3_model.py SD3Inferencer: latent_channels = 16, no scale_factor
    (latent_format.scale_factor 1.5305); set_model_type marks it is_sd3."""

    def __init__(self, filename="sd3_medium.safetensors"):
        self.latent_channels = 16
        self.is_sd1 = self.is_sd2 = self.is_sdxl = False
        self.is_sd3 = True
        self.sd_checkpoint_info = CheckpointInfo(filename)


# ------------------------------------------------------------------ scale, channels, prediction

ACCEPTED = [  # (model, scale, channels, prediction)
    (StableDiffusion(), 0.18215, 4, "epsilon"),
    (StableDiffusion(prediction_type="v_prediction"), 0.18215, 4, "v_prediction"),
    (StableDiffusionXL(), 0.13025, 4, "epsilon"),
    (StableDiffusionXL(scaling_factor=0.5), 0.5, 4, "epsilon"),  # a VAE config.json with another scale (Playground)
    (NeoStableDiffusion(), 0.18215, 4, "epsilon"),
    (NeoStableDiffusionXL(), 0.13025, 4, "epsilon"),
    (LatentDiffusion(), 0.18215, 4, None),
    (LatentDiffusion(sdxl=True), 0.13025, 4, None),
]


@pytest.mark.parametrize("model,scale,channels,prediction", ACCEPTED,
                         ids=[f"{type(m).__name__}-{s}-{p}" for m, s, _, p in ACCEPTED])
def test_scale_channels_and_prediction_of_accepted_targets(model, scale, channels, prediction):
    assert host.target_latent_scale(model) == pytest.approx(scale)
    assert host.target_latent_channels(model) == channels
    assert host.target_prediction(model) == prediction
    host.check_target(model)  # no exception


def test_neo_scale_comes_from_the_vae_latent_format_not_the_model_type():
    """Neo's VAE has no `scaling_factor` (its process_in is latent_format.process_in): the scale is read from
    there, not guessed from is_sdxl."""
    model = NeoStableDiffusionXL()
    model.forge_objects.vae.first_stage_model.latent_format = LatentFormat(0.5)
    assert host.target_latent_scale(model) == 0.5


def test_scale_fallback_by_model_type():
    bare_sdxl = types.SimpleNamespace(is_sdxl=True)
    assert host.target_latent_scale(bare_sdxl) == 0.13025
    assert host.target_latent_scale(types.SimpleNamespace()) == 0.18215
    assert host.target_latent_channels(types.SimpleNamespace()) == 4


def test_forge_scale_is_what_the_forge_vae_multiplies_latents_by():
    """The scale host.py reports turns a VAE latent into the latent the sampler sees exactly as Forge's own
    IntegratedAutoencoderKL.process_in does: (z - shift_factor) * scaling_factor."""
    model = StableDiffusionXL()
    vae = model.forge_objects.vae.first_stage_model
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    forge_process_in = (z - vae.shift_factor) * vae.scaling_factor
    assert torch.allclose(z * host.target_latent_scale(model), forge_process_in)


# ------------------------------------------------------------------ refusals

REFUSED = [  # (model, channels in message, how)
    (Flux(), 16, "channels"),
    (StableDiffusion3(), 16, "channels"),
    (Mugen(), 32, "channels"),
    (SD3Inferencer(), 16, "channels"),
    (NeoStableDiffusionXL("noob_rf.safetensors", rectified_flow=True), 4, "flow"),
    (StableDiffusionXL("sdxl_flow.safetensors", prediction_type="const"), 4, "flow"),
]


@pytest.mark.parametrize("model,channels,how", REFUSED, ids=[type(m).__name__ + "-" + h for m, _, h in REFUSED])
def test_refused_targets_raise_a_user_error_that_names_the_checkpoint_and_the_way_out(model, channels, how):
    assert host.target_latent_channels(model) == channels
    with pytest.raises(UserError) as caught:
        host.check_target(model)
    err = caught.value
    name = model.sd_checkpoint_info.name_for_extra
    assert name in err.subject and name in str(err)
    assert "checkpoint" in err.subject
    # what to do: pick a checkpoint this works with, or turn the extension off
    assert "SDXL" in err.fix and "turn Delta Sampling off" in err.fix
    if how == "channels":
        assert f"{channels}-channel" in err.problem and type(model).__name__ in err.problem
    else:
        assert "flow" in err.problem


def test_legacy_flag_refuses_even_a_4_channel_non_legacy_model():
    """A Forge engine that is not `is_webui_legacy_model()` (Chroma, Flux...) is refused even if a VAE reports 4
    channels: its latent is not the SD one."""
    model = Flux()
    model.forge_objects.vae.latent_channels = 4
    with pytest.raises(UserError):
        host.check_target(model)


def test_target_name_falls_back_to_the_class_name():
    model = StableDiffusion()
    del model.sd_checkpoint_info
    assert host.target_name(model) == "StableDiffusion"
    model = StableDiffusion()
    model.sd_checkpoint_info.name_for_extra = None
    assert host.target_name(model) == model.sd_checkpoint_info.title



# ------------------------------------------------------------------ memory through the host's manager

class _ForgeMemory(types.ModuleType):
    """`backend/memory_management.py` as Forge and Neo define the two calls used: get_free_memory(dev)
    and free_memory(memory_required, device, keep_loaded=[]) (Forge adds free_all=False, Neo does not)."""

    def __init__(self, free: int) -> None:
        super().__init__("backend.memory_management")
        self.free, self.calls = free, []

    def get_free_memory(self, dev=None, torch_free_too=False):
        return self.free

    def free_memory(self, memory_required, device, keep_loaded=[]):  # noqa: B006 - the host's signature
        self.calls.append((memory_required, device))


def test_forge2_memory_goes_through_the_host_manager(monkeypatch):
    memory = _ForgeMemory(free=3 * 1024 ** 3)
    monkeypatch.setitem(sys.modules, "backend.sampling.sampling_function", types.ModuleType("x"))
    monkeypatch.setitem(sys.modules, "backend.memory_management", memory)
    cuda = torch.device("cuda", 0)
    assert host.free_bytes(cuda) == 3 * 1024 ** 3                   # the host's count, not torch's
    host.make_room(cuda, 5_000)
    host.make_room(torch.device("cpu"), 7_000)                       # only a CUDA device is made room on
    assert memory.calls == [(5_000, cuda)]


def test_other_hosts_are_not_asked_to_make_room(monkeypatch):
    memory = _ForgeMemory(free=0)
    monkeypatch.delitem(sys.modules, "backend.sampling.sampling_function", raising=False)
    monkeypatch.setitem(sys.modules, "backend.memory_management", memory)  # some other "backend" package
    host.make_room(torch.device("cuda", 0), 5_000)
    assert memory.calls == []
