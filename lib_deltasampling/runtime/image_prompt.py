"""IP-Adapter on the source pair's adapted rows: an image prompt the delta carries to the target
(issue 12; the paper's SD1.5 -> SD2.1 IP-Adapter-plus transfer).

IP-Adapter adds to every cross-attention (attn2) a second attention over image tokens:
    out = to_out(attention(q, k, v) + w * attention(q, to_k_ip(img), to_v_ip(img)))
Here the second term is added by a forward hook on each attn2, to the adapted rows only, as
`w * to_out(attention(q, k_ip, v_ip)) - w * to_out.bias` (to_out is linear, so this equals the
formula; the base rows are computed exactly as without it). The image keys and values are
computed once per generation (the image tokens do not change between steps): per layer a
[rows, tokens, inner] K and V for the adapted rows' layout, uncond rows getting the uncond
image tokens and cond rows the image's, as the IP-Adapter reference pipeline does.

The k-th cross-attention of the UNet in diffusers' attention-processor order (down blocks, up
blocks, then the middle block) takes the file's `ip_adapter.{2k+1}` weights; `attn2_in_diffusers_order`
lists our UNet's attn2 modules in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import attention
from .unet import CrossAttention, UNetModel


def attn2_in_diffusers_order(unet: UNetModel) -> list[CrossAttention]:
    """The UNet's cross-attention modules: input blocks, output blocks, then the middle block."""
    def attn2s(blocks: nn.Module) -> list[CrossAttention]:
        return [m for name, m in blocks.named_modules() if name.endswith("attn2") and isinstance(m, CrossAttention)]
    return attn2s(unet.input_blocks) + attn2s(unet.output_blocks) + attn2s(unet.middle_block)


class ImagePromptHooks:
    """The IP-Adapter's extra attention on the attn2 layers of one UNet, for a block of rows.

        hooks = ImagePromptHooks(unet, kv_layers, cond_tokens, uncond_tokens, weight=0.8)
        hooks.prepare(batch=1, with_uncond=True)   # K, V for [uncond x batch, cond x batch] rows
        hooks.attach()
        hooks.rows = slice(2, 4)                   # before a forward: the adapted rows
        ... unet(...) ...
        hooks.rows = None
        hooks.detach()
    """

    def __init__(self, unet: UNetModel, kv_layers: Sequence[tuple[nn.Module, nn.Module]], cond: torch.Tensor,
                 uncond: torch.Tensor, weight: float = 1.0) -> None:
        self.layers = attn2_in_diffusers_order(unet)
        if len(kv_layers) != len(self.layers):
            raise ValueError(f"the IP-Adapter has {len(kv_layers)} cross-attention layers, the UNet "
                             f"{len(self.layers)}: they are not made for each other")
        self.kv_layers = list(kv_layers)
        self.cond, self.uncond = cond, uncond     # image tokens [1, T, C]
        self.weight = float(weight)
        self.rows: slice | None = None
        self._layout: tuple[int, bool] | None = None
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    def prepare(self, *, batch: int, with_uncond: bool) -> None:
        """K and V per layer for the adapted rows' layout: [uncond x batch (with_uncond), cond x batch]."""
        if self._layout == (batch, with_uncond):
            return
        parts = ([self.uncond.expand(batch, -1, -1)] if with_uncond else []) + [self.cond.expand(batch, -1, -1)]
        tokens = torch.cat(parts)
        with torch.no_grad():
            self._kv = [(to_k(tokens), to_v(tokens)) for to_k, to_v in self.kv_layers]
        self._layout = (batch, with_uncond)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def add_image_attention(module: CrossAttention, args: tuple, output: torch.Tensor) -> None:
            rows = self.rows
            if rows is None or self.weight == 0.0:
                return
            x = args[0][rows]
            k, v = self._kv[index]
            out = module.to_out[0](attention(module.to_q(x), k.to(x.dtype), v.to(x.dtype), module.heads))
            if module.to_out[0].bias is not None:
                out = out - module.to_out[0].bias.to(out.dtype)
            output[rows].add_(out, alpha=self.weight)   # the attn2 output is fresh: in place is safe
        return add_image_attention
