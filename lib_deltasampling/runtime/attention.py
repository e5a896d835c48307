"""The one attention function of the runtime.

Everything goes through `torch.nn.functional.scaled_dot_product_attention`, which picks
a fused kernel (flash / memory-efficient on CUDA, a blocked one on CPU). Those kernels
keep the softmax statistics in float32 for half inputs, so no manual upcast is needed,
and they never materialise the [tokens x tokens] weight matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v.

    q: [B, Nq, heads * d], k and v: [B, Nk, heads * d]  ->  [B, Nq, heads * d].
    """
    b, nq, inner = q.shape
    d = inner // heads
    # [B, N, H*d] -> [B, H, N, d] as strided views (no copy for the
    # contiguous Linear outputs); SDPA reads strided inputs directly.
    q = q.reshape(b, nq, heads, d).transpose(1, 2)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    # The fused kernels return a [B, N, H, d]-contiguous buffer viewed as [B, H, N, d],
    # so this transpose is free and reshape does not copy there.
    return out.transpose(1, 2).reshape(b, nq, inner)
