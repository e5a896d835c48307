"""transformers CLIP text models built as independent references for the runtime's encoders.

The HF layout (SD1 and SDXL CLIP-L) loads as stored; the OpenCLIP layout (SD2, SDXL bigG) goes
through diffusers' own `convert_open_clip_checkpoint` (in_proj split into q/k/v, ...).
"""

from __future__ import annotations

from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import factory_text as ft

BOS, EOS = 49406, 49407


def hf_config(width: int, layers: int, act: str, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=ft.VOCAB, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=width // 64, max_position_embeddings=77,
                          hidden_act=act, layer_norm_eps=1e-5, projection_dim=projection or width,
                          bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)


def hf_clip_l(state: dict, prefix: str, size: tuple[int, int] = ft.CLIP_L) -> CLIPTextModel:
    """HF layout: the file's tensors as they are (transformers 5 drops the `text_model.` level)."""
    m = CLIPTextModel._from_config(hf_config(*size, "quick_gelu"), attn_implementation="eager")
    pre = prefix + "text_model."
    m.load_state_dict({k[len(pre):]: v for k, v in state.items()
                       if k.startswith(pre) and not k.endswith("position_ids")}, strict=True)
    return m.eval()


def hf_openclip(state: dict, prefix: str, size: tuple[int, int], projection: int | None):
    """OpenCLIP layout converted by diffusers; with a projection as CLIPTextModelWithProjection."""
    conv = convert_open_clip_checkpoint(None, state, prefix=prefix)
    cfg = hf_config(*size, "gelu", projection)
    if projection is None:
        m = CLIPTextModel._from_config(cfg, attn_implementation="eager")
        conv = {k[len("text_model."):]: v for k, v in conv.items()}
    else:
        m = CLIPTextModelWithProjection._from_config(cfg, attn_implementation="eager")
    m.load_state_dict(conv, strict=True)
    return m.eval()
