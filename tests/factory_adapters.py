"""Random adapter layer groups in the canonical part names, for tests and test adapter files.

    group = lora_group(320, 768, rank=8)      # {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}
    group = lora_group(320, 320, 4, kernel=(3, 3), mid=True, dora="out")
    group = group_for("lokr", base_weight.shape, seed=1, w2="tucker")

Shapes follow the formats (see lib_deltasampling/runtime/adapters/*.py docstrings). `kernel=None`
means Linear-shaped (2-D) parts, `kernel=(1, 1)` or `(3, 3)` conv-shaped (4-D) parts.
Values are scaled for bases like tests/factory_unet.py's (weights ~ N(0, 1/fan_in), norm weights
~ 1): the scaled difference scale * dW has entries of std `rel / sqrt(fan_in)` (default rel 0.5),
so adapted outputs differ from base outputs by O(0.1-1) and any wrong formula shows. `alpha`
defaults to rank / 2 (scale 0.5, so a missing alpha/rank scale is visible too); `with_alpha=False`
leaves it out (scale 1). DoRA magnitudes (`dora="out"`: [out, 1, ...], LyCORIS/PEFT;
`dora="in"`: [1, in, ...], A1111) are the expected norm of such a weight times 1 +- 0.2.
"""

from __future__ import annotations

import math

import torch

Kernel = tuple[int, int] | None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _fan_in(in_: int, kernel: Kernel) -> int:
    return in_ * math.prod(kernel or (1,))


def _scale(rank: int | None, alpha: float | None, with_alpha: bool) -> tuple[float, dict]:
    """The alpha part and the scale it implies (A1111: alpha / rank)."""
    if not with_alpha or rank is None:
        return 1.0, {}
    alpha = rank / 2 if alpha is None else alpha
    return alpha / rank, {"alpha": torch.tensor(float(alpha))}


def _dora(gen: torch.Generator, axis: str | None, out: int, in_: int, kernel: Kernel, rel: float) -> dict:
    if axis is None:
        return {}
    ones = [1] * (2 if kernel else 0)
    if axis == "out":       # norm of a row of fan_in entries of variance (1 + rel^2) / fan_in
        shape, expected = (out, 1, *ones), math.sqrt(1 + rel ** 2)
    elif axis == "in":      # norm of a column of out * k entries of that variance
        shape = (1, in_, *ones)
        expected = math.sqrt(out * math.prod(kernel or (1,)) * (1 + rel ** 2) / _fan_in(in_, kernel))
    else:
        raise ValueError(f"dora must be None, 'out' or 'in', not {axis!r}")
    return {"dora_scale": expected * (1 + 0.2 * _randn(gen, *shape))}


def split(n: int) -> tuple[int, int]:
    """n = m * k with m the largest divisor <= sqrt(n) (LoKr's default factor split)."""
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def lora_group(out: int, in_: int, rank: int, *, kernel: Kernel = None, alpha: float | None = None,
               with_alpha: bool = True, mid: bool = False, dora: str | None = None, seed: int = 0,
               rel: float = 0.5) -> dict[str, torch.Tensor]:
    """LoRA/LoCon parts; `mid=True` (needs a kernel): Tucker lora_mid with 1x1 down/up."""
    gen = _gen(seed)
    scale, group = _scale(rank, alpha, with_alpha)
    sigma = rel / math.sqrt(_fan_in(in_, kernel)) / scale
    if mid:
        if kernel is None:
            raise ValueError("lora_mid needs a conv kernel")
        group["lora_down.weight"] = _randn(gen, rank, in_, 1, 1)
        group["lora_mid.weight"] = _randn(gen, rank, rank, *kernel)
        group["lora_up.weight"] = _randn(gen, out, rank, 1, 1, std=sigma / rank)
    else:
        k = list(kernel) if kernel else []
        group["lora_down.weight"] = _randn(gen, rank, in_, *k)
        group["lora_up.weight"] = _randn(gen, out, rank, *([1] * len(k)), std=sigma / math.sqrt(rank))
    group.update(_dora(gen, dora, out, in_, kernel, rel))
    return group


def loha_group(out: int, in_: int, rank: int, *, kernel: Kernel = None, alpha: float | None = None,
               with_alpha: bool = True, tucker: bool = False, dora: str | None = None, seed: int = 0,
               rel: float = 0.5) -> dict[str, torch.Tensor]:
    """LoHa parts; conv parts are LyCORIS's [r, in*kh*kw] hada_wX_b, or with `tucker=True`
    hada_t1/t2 [r, r, kh, kw] with hada_wX_a [r, out] and hada_wX_b [r, in]."""
    gen = _gen(seed)
    scale, group = _scale(rank, alpha, with_alpha)
    sigma = rel / math.sqrt(_fan_in(in_, kernel)) / scale
    for n, std in (("1", 1.0), ("2", sigma)):      # half 1 entries ~ 1, half 2 entries ~ sigma
        if tucker:
            if kernel is None:
                raise ValueError("LoHa Tucker cores need a conv kernel")
            group[f"hada_w{n}_a"] = _randn(gen, rank, out, std=std)
            group[f"hada_w{n}_b"] = _randn(gen, rank, in_)
            group[f"hada_t{n}"] = _randn(gen, rank, rank, *kernel, std=1 / rank)
        else:
            group[f"hada_w{n}_a"] = _randn(gen, out, rank, std=std)
            group[f"hada_w{n}_b"] = _randn(gen, rank, _fan_in(in_, kernel), std=1 / math.sqrt(rank))
    group.update(_dora(gen, dora, out, in_, kernel, rel))
    return group


def lokr_group(out: int, in_: int, rank: int = 2, *, kernel: Kernel = None, w1: str = "full",
               w2: str = "factors", w1_shape: tuple[int, int] | None = None, w2b_4d: bool = False,
               w1_rank: int | None = None,
               alpha: float | None = None, with_alpha: bool = True, dora: str | None = None, seed: int = 0,
               rel: float = 0.5) -> dict[str, torch.Tensor]:
    """LoKr parts: w1 [a, c] "full" or "factors"; w2 [b, d(, kh, kw)] "full", "factors"
    (lokr_w2_b [r, d*kh*kw], or [r, d, kh, kw] with `w2b_4d`) or "tucker" (lokr_t2, needs a kernel).
    a*b = out, c*d = in; (a, c) defaults to the smaller halves of `split(out)`, `split(in_)`.
    `w1_rank` gives w1's factors their own rank (the scale then follows lokr_w2_b's, as A1111)."""
    gen = _gen(seed)
    a, c = w1_shape or (split(out)[0], split(in_)[0])
    b, d = out // a, in_ // c
    factored = w1 == "factors" or w2 != "full"
    scale, group = _scale(rank if factored else None, alpha, with_alpha)
    sigma = rel / math.sqrt(_fan_in(in_, kernel)) / scale
    k = list(kernel) if kernel else []
    if w1 == "full":
        group["lokr_w1"] = _randn(gen, a, c)
    else:
        r1 = w1_rank or rank
        group["lokr_w1_a"] = _randn(gen, a, r1)
        group["lokr_w1_b"] = _randn(gen, r1, c, std=1 / math.sqrt(r1))
    if w2 == "full":
        group["lokr_w2"] = _randn(gen, b, d, *k, std=sigma)
    elif w2 == "factors":
        group["lokr_w2_a"] = _randn(gen, b, rank, std=sigma)
        w2b_shape = (d, *k) if w2b_4d else (d * math.prod(k or [1]),)
        group["lokr_w2_b"] = _randn(gen, rank, *w2b_shape, std=1 / math.sqrt(rank))
    elif w2 == "tucker":
        if kernel is None:
            raise ValueError("lokr_t2 needs a conv kernel")
        group["lokr_w2_a"] = _randn(gen, rank, b, std=sigma)
        group["lokr_w2_b"] = _randn(gen, rank, d)
        group["lokr_t2"] = _randn(gen, rank, rank, *kernel, std=1 / rank)
    else:
        raise ValueError(f"w2 must be 'full', 'factors' or 'tucker', not {w2!r}")
    group.update(_dora(gen, dora, out, in_, kernel, rel))
    return group


def full_group(out: int, in_: int, *, kernel: Kernel = None, bias: bool = True, dora: str | None = None,
               seed: int = 0, rel: float = 0.5) -> dict[str, torch.Tensor]:
    """diff [out, in(, kh, kw)] and diff_b [out]."""
    gen = _gen(seed)
    group = {"diff": _randn(gen, out, in_, *(kernel or ()), std=rel / math.sqrt(_fan_in(in_, kernel)))}
    if bias:
        group["diff_b"] = _randn(gen, out, std=0.1 * rel)
    group.update(_dora(gen, dora, out, in_, kernel, rel))
    return group


def norm_group(channels: int, *, bias: bool = True, seed: int = 0, rel: float = 0.5) -> dict[str, torch.Tensor]:
    """w_norm (std 0.6 * rel, against norm weights ~ 1) and b_norm [channels]."""
    gen = _gen(seed)
    group = {"w_norm": _randn(gen, channels, std=0.6 * rel)}
    if bias:
        group["b_norm"] = _randn(gen, channels, std=0.2 * rel)
    return group


def group_for(algorithm: str, weight_shape: tuple[int, ...] | torch.Size, *, seed: int = 0,
              rank: int = 4, **options) -> dict[str, torch.Tensor]:
    """A group for a base weight of `weight_shape` ([out, in] Linear, [out, in, kh, kw] Conv2d,
    [C] norm): algorithm "lora" (LoCon on convs), "loha", "lokr", "full" or "norm"."""
    shape = tuple(weight_shape)
    if algorithm == "norm":
        return norm_group(shape[0], seed=seed, **options)
    out, in_ = shape[:2]
    kernel = tuple(shape[2:]) or None
    if algorithm == "lora":
        return lora_group(out, in_, rank, kernel=kernel, seed=seed, **options)
    if algorithm == "loha":
        return loha_group(out, in_, rank, kernel=kernel, seed=seed, **options)
    if algorithm == "lokr":
        return lokr_group(out, in_, rank, kernel=kernel, seed=seed, **options)
    if algorithm == "full":
        return full_group(out, in_, kernel=kernel, seed=seed, **options)
    raise ValueError(f"unknown algorithm {algorithm!r}")
