"""Full-size random checkpoints and a kohya LoRA in the real single-file layouts, for real hosts.

A1111 builds SD1.5/SDXL from its fixed yaml configs, so a test model must have every tensor at the
real size. Keys and shapes come from the published architectures (ldm/sgm UNet, CLIP-L in the
transformers layout, OpenCLIP bigG, the ldm AutoencoderKL); the UNet's keys are read off the
runtime's `UNetModel` built on the meta device with the real configs (the runtime is checked
against diffusers' conversions elsewhere). Weights are random, scaled by fan-in (norm scales ~1,
small biases) so activations stay O(1) and a host's NaN check never fires.

The files are streamed tensor by tensor (a 7 GB SDXL file never sits in memory) in the
safetensors format: 8-byte little-endian header length, JSON header, data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from factories import vae_shapes as ldm_vae_shapes  # tests/factories.py: the VAE's keys, any size
from lib_deltasampling.runtime.controlnet import ControlNet
from lib_deltasampling.runtime.unet import UNetModel
from lib_deltasampling.runtime.unet_config import UNetConfig

MODELS_VERSION = "1"   # bump when this module changes what it writes (the files are cached)
TARGET = "a-target-sd15.safetensors"      # alphabetically first: A1111's own choice at start too
SOURCE = "source-sd15.safetensors"
SDXL_TARGET = "sdxl-target.safetensors"
LORA = "dslora"
CONTROLNET = "dscontrol-sd15"
IPADAPTER = "ds-ip-adapter_sd15"          # plain, full size (its CLIP input: 1024-wide image embeddings)
CLIP_VISION = "ds-clip-vision-small"      # a small HF-layout encoder with ViT-H's 1024 projection
DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
VOCAB, CONTEXT = 49408, 77

SD15_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    transformer_depth_middle=1, context_dim=768, num_heads=8, use_linear_in_transformer=False)
SDXL_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
    transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
    transformer_depth_middle=10, context_dim=2048, num_head_channels=64, use_linear_in_transformer=True,
    adm_in_channels=2816)


# ------------------------------------------------------------------ shapes of each part

def unet_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {"model.diffusion_model." + k: tuple(v.shape) for k, v in UNetModel(config).state_dict().items()}


def hf_clip_shapes(prefix: str, width: int, layers: int) -> dict[str, tuple[int, ...]]:
    """transformers' CLIPTextModel (`text_model.*`), as in SD1.x and SDXL's first text encoder."""
    s = {f"{prefix}text_model.embeddings.token_embedding.weight": (VOCAB, width),
         f"{prefix}text_model.embeddings.position_embedding.weight": (CONTEXT, width),
         f"{prefix}text_model.final_layer_norm.weight": (width,), f"{prefix}text_model.final_layer_norm.bias": (width,)}
    for n in range(layers):
        p = f"{prefix}text_model.encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"], s[p + f"self_attn.{proj}.bias"] = (width, width), (width,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[p + f"{ln}.weight"], s[p + f"{ln}.bias"] = (width,), (width,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (4 * width, width), (4 * width,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (width, 4 * width), (width,)
    return s


def openclip_shapes(prefix: str, width: int, layers: int, projection: int) -> dict[str, tuple[int, ...]]:
    """open_clip's text tower (`transformer.resblocks.*`), as SDXL's second text encoder (bigG)."""
    s = {f"{prefix}token_embedding.weight": (VOCAB, width), f"{prefix}positional_embedding": (CONTEXT, width),
         f"{prefix}ln_final.weight": (width,), f"{prefix}ln_final.bias": (width,),
         f"{prefix}text_projection": (width, projection), f"{prefix}logit_scale": ()}
    for n in range(layers):
        p = f"{prefix}transformer.resblocks.{n}."
        s.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                  p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                  p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                  p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (4 * width, width),
                  p + "mlp.c_fc.bias": (4 * width,), p + "mlp.c_proj.weight": (width, 4 * width),
                  p + "mlp.c_proj.bias": (width,)})
    return s


def vae_shapes(prefix: str = "first_stage_model.") -> dict[str, tuple[int, ...]]:
    """ldm AutoencoderKL at full size (the `ddconfig` of v1-inference.yaml and sd_xl_base.yaml)."""
    return {prefix + k: v for k, v in ldm_vae_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2).items()}


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    return {**unet_shapes(SD15_UNET), **hf_clip_shapes("cond_stage_model.transformer.", 768, 12), **vae_shapes()}


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    return {**unet_shapes(SDXL_UNET), **hf_clip_shapes("conditioner.embedders.0.transformer.", 768, 12),
            **openclip_shapes("conditioner.embedders.1.model.", 1280, 32, 1280), **vae_shapes()}


# ------------------------------------------------------------------ values and the streamed file

def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Fan-in scaled weights, norm scales ~1, biases ~0.1 (the same rule as tests/factories.py)."""
    if key.endswith("logit_scale"):
        return torch.tensor(4.6052, dtype=dtype)
    noise = torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        value = noise / math.sqrt(math.prod(shape[1:]))
    elif key.endswith(".weight"):
        value = 1.0 + 0.1 * noise
    else:
        value = 0.1 * noise
    return value.to(dtype)


def write_streamed(path: Path, shapes: dict[str, tuple[int, ...]], make: callable, dtype: torch.dtype,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file, producing each tensor with `make(key, shape)` only when it is written."""
    keys = sorted(shapes)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
    for key in keys:
        size = math.prod(shapes[key]) * itemsize
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            tensor = make(key, shapes[key]).to(dtype).contiguous()
            f.write(tensor.numpy().tobytes() if dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    tmp.replace(path)
    return path


def write_checkpoint(path: Path, family: str, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    shapes = {"sd15": sd15_shapes, "sdxl": sdxl_shapes}[family]()
    gen = torch.Generator().manual_seed(seed)
    return write_streamed(path, shapes, lambda k, s: random_tensor(k, s, gen, dtype), dtype)


def write_controlnet(path: Path, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    """A full-size SD1.5 ControlNet (lllyasviel layout, `control_model.*`), random like the checkpoints."""
    with torch.device("meta"):
        shapes = {"control_model." + k: tuple(v.shape) for k, v in ControlNet(SD15_UNET.encoder()).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return write_streamed(path, shapes, lambda k, s: random_tensor(k, s, gen, dtype), dtype)


def write_ip_adapter(path: Path, seed: int) -> Path:
    """A full-size plain SD1.5 IP-Adapter (.safetensors flat keys): the image projection to 4 tokens of
    768 and one (to_k_ip, to_v_ip) pair per cross-attention, in diffusers' processor order."""
    from factory_ipadapter import flat_ip_adapter, kv_weights, nested_ip_adapter, plain_image_proj
    from lib_deltasampling.runtime.image_prompt import attn2_in_diffusers_order
    with torch.device("meta"):
        widths = [m.to_k.out_features for m in attn2_in_diffusers_order(UNetModel(SD15_UNET))]
    tensors = flat_ip_adapter(nested_ip_adapter(plain_image_proj(1024, 768, seed=seed), kv_weights(768, widths, seed)))
    from safetensors.torch import save_file
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_clip_vision(path: Path, seed: int) -> Path:
    """A small CLIP vision encoder (HF layout, 224 px, patch 14) whose projection has ViT-H's width."""
    from factory_ipadapter import clip_vision_state
    from safetensors.torch import save_file
    tensors = clip_vision_state(width=128, layers=2, projection=1024, image=224, patch=14, seed=seed)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    return path


# ------------------------------------------------------------------ a kohya LoRA for SD1.5

def sd15_attention_layers() -> Iterator[tuple[str, int, int]]:
    """(kohya name stem, out, in) of the attention projections of SD1.5's UNet in diffusers naming,
    as kohya's sd-scripts writes them (`lora_unet_down_blocks_0_attentions_0_..._to_q`)."""
    blocks = [(f"down_blocks_{b}_attentions_{a}", c) for b, c in enumerate((320, 640, 1280)) for a in range(2)]
    blocks += [("mid_block_attentions_0", 1280)]
    blocks += [(f"up_blocks_{b}_attentions_{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in range(3)]
    for block, c in blocks:
        stem = f"lora_unet_{block}_transformer_blocks_0_"
        for attn, kv_in in (("attn1", c), ("attn2", 768)):
            yield stem + f"{attn}_to_q", c, c
            yield stem + f"{attn}_to_k", c, kv_in
            yield stem + f"{attn}_to_v", c, kv_in
            yield stem + f"{attn}_to_out_0", c, c


def sd15_text_layers() -> Iterator[tuple[str, int, int]]:
    for n in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"lora_te_text_model_encoder_layers_{n}_self_attn_{proj}", 768, 768


def write_lora(path: Path, seed: int, rank: int = 8, strength: float = 1.0, every: int = 1) -> Path:
    """A kohya LoRA (`lora_down`/`lora_up`/`alpha`) on every UNet attention projection and the text
    encoder's attention (every `every`-th of them); `strength` scales up so the adapted model
    differs visibly from the base."""
    shapes: dict[str, tuple[int, ...]] = {}
    for stem, out, in_ in list((*sd15_attention_layers(), *sd15_text_layers()))[::every]:
        shapes[f"{stem}.lora_down.weight"] = (rank, in_)
        shapes[f"{stem}.lora_up.weight"] = (out, rank)
        shapes[f"{stem}.alpha"] = ()
    gen = torch.Generator().manual_seed(seed)

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith(".alpha"):
            return torch.tensor(float(rank))
        return torch.randn(shape, generator=gen) / math.sqrt(shape[1]) * (strength if "lora_up" in key else 1.0)

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1"}
    return write_streamed(path, shapes, make, torch.float16, metadata=meta)
