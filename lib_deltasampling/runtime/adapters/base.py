"""What every adapter algorithm provides, and what it is given about the layer it adapts.

An algorithm module (lora.py, loha.py, lokr.py, full.py) turns one layer's tensors from an
adapter file into an `AdapterLayer`. The layer never changes the base weights: `bypass`
adds the adaptation to the base layer's output for the rows it is given (the adapted rows
of a batch), so base and adapted predictions share one copy of the base weights.
`diff_weight` gives the same adaptation as a weight difference, for merging and `inspect`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LayerSpec:
    """The base layer an adapter layer applies to (a Linear, a Conv2d, a norm, or a row slice
    of a packed weight such as OpenCLIP's q/k/v `in_proj_weight`)."""

    kind: str                          # "linear" | "conv" | "norm" ("norm": LayerNorm/GroupNorm affine)
    weight: torch.Tensor               # the base weight (a view for sliced targets); never modified
    bias: torch.Tensor | None
    stride: tuple[int, int] = (1, 1)   # conv only
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    norm_eps: float = 1e-5             # norm only: the layer's eps
    norm_groups: int | None = None     # norm only: GroupNorm's num_groups; None = LayerNorm over weight.shape


class AdapterLayer(Protocol):
    algorithm: str                     # "lora", "locon", "loha", "lokr", "full", "norm" (+ "dora" flag below)
    rank: int | None                   # None for full/norm differences
    dora: bool

    def check(self, base: LayerSpec) -> str | None:
        """None if the layer fits `base`, else what does not fit (shapes), for the error message."""

    def diff_weight(self, base: LayerSpec, multiplier: float) -> torch.Tensor:
        """The adapted weight minus the base weight, shaped like `base.weight` (alpha/rank scale applied).
        For DoRA this is the full difference of the re-normalised weight."""

    def diff_bias(self, base: LayerSpec, multiplier: float) -> torch.Tensor | None:
        """The adapted bias minus the base bias, or None."""

    def add_delta_(self, x: torch.Tensor, out: torch.Tensor, base: LayerSpec, multiplier: float) -> None:
        """`out += (adapted op - base op)(x)` in place: what the batched forward's hooks call.
        Differences add up, so several adapters on one layer chain (DoRA included)."""

    def bypass(self, x: torch.Tensor, out: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        """`out` = the base layer's output for input rows `x`; return the adapted output for those rows.

        Must equal `base op with (weight + diff_weight, bias + diff_bias)` applied to `x`, computed
        without materialising a second full weight where the algorithm allows (LoRA: up(down(x))).
        No host syncs, no Python loops over rows. `x`/`out` may be fp16/bf16: compute in their dtype.
        """
