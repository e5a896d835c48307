"""A ControlNet on the source pair's adapted branch: the structure it adds reaches the target as
part of the delta (issue 12; the paper's cross-family ControlNet transfer).

    control = SourceControl(net, image, weight=1.0, mode="balanced")   # image [1, C, H, W] in 0..1
    control.check(pair.base)                                          # same family as the source
    prepared = control.prepare((64, 64), device, dtype)               # hint at 8 x the latent size, once a pass
    outs = pair.denoise(x, sigma, conds, control=prepared)            # adapted rows get the residuals

The residuals are added to the adapted rows of the fused source batch only, so the base rows are
computed exactly as without a ControlNet and the delta D_A - D_S carries the ControlNet's effect.

Control modes, as sd-webui-controlnet defines them (`hook.py`, `ControlMode`):
- balanced: every residual times the weight, on the uncond and cond rows;
- prompt ("My prompt is more important"): soft injection, residual i of n times
  weight * 0.825^(12 - i) (the shallow skips weakest, ldm's guess-mode scales; SDXL's 10 residuals
  take the first 10 of the 13);
- control ("ControlNet is more important"): soft injection, on the cond rows only (the uncond rows'
  residuals are zero there, so here the ControlNet runs on the cond rows alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import ModelFileError
from .unet import ControlResiduals

CONTROL_MODES = ("balanced", "prompt", "control")
SOFT_BASE = 0.825   # ldm ControlNet guess mode / sd-webui-controlnet soft injection
SOFT_DEPTH = 12     # the exponent of the first residual (SD1's 13 residuals: 0.825^12 .. 0.825^0)


class ControlNetLike(Protocol):
    """What SourceControl needs of a loaded ControlNet (runtime/controlnet.py `LoadedControlNet`)."""

    info: Any     # .family, .hint_channels, .path
    model: torch.nn.Module   # model(x, hint, timesteps, context, y) -> residuals, input blocks then middle


def residual_scales(mode: str, weight: float, count: int) -> list[float]:
    """The factor of each of `count` residuals (input blocks in order, the middle block last)."""
    if mode == "balanced":
        return [float(weight)] * count
    return [float(weight) * SOFT_BASE ** float(SOFT_DEPTH - i) for i in range(count)]


def crop_and_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """sd-webui-controlnet's default "Crop and Resize": scale `image` [N, C, H, W] to cover
    height x width keeping its aspect, then cut the centre. Antialiased bilinear when shrinking."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return resized[..., top:top + height, left:left + width].clamp(0, 1)


@dataclass
class SourceControl:
    """One ControlNet unit on the source: the net, the (already preprocessed) hint image and how
    strongly and when it applies (the window is fractions of the steps, ends included, as in
    sd-webui-controlnet: active while start <= step / steps <= end)."""

    net: ControlNetLike
    image: torch.Tensor          # [1, C, H, W] float in 0..1, any size
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"

    def check(self, source: Any) -> None:
        """Refuse a ControlNet that does not fit the source model (`SourceModel`), naming both."""
        info = self.net.info
        name = info.path.name if getattr(info, "path", None) else "the ControlNet"
        if info.family is not source.family:
            src = source.info.path.name if source.info.path else "the source base"
            raise ModelFileError(info.path or name, f"is a {info.family.label} ControlNet but the source base {src} "
                                 f"is {source.family.label}",
                                 f"Use a ControlNet made for {source.family.label}, the source's family")
        mine, theirs = info.unet, source.info.unet.encoder()
        if (mine.model_channels, mine.channel_mult, mine.num_res_blocks, mine.context_dim, mine.adm_in_channels) != (
                theirs.model_channels, theirs.channel_mult, theirs.num_res_blocks, theirs.context_dim,
                theirs.adm_in_channels):
            raise ModelFileError(info.path or name, "does not fit the source's UNet (its blocks or widths differ: "
                                 f"{mine.model_channels} channels x {mine.channel_mult}, context {mine.context_dim}; "
                                 f"the source: {theirs.model_channels} x {theirs.channel_mult}, context "
                                 f"{theirs.context_dim})", "Use a ControlNet trained for the source base model's "
                                 "architecture")
        if self.image.shape[1] != info.hint_channels:
            raise ModelFileError(info.path or name, f"takes a {info.hint_channels}-channel control image, "
                                 f"the image given has {self.image.shape[1]}",
                                 "Use an RGB control image (this ControlNet kind is not supported otherwise)")
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.mode!r}; use one of {', '.join(CONTROL_MODES)}")

    def active(self, step: int, steps: int) -> bool:
        return self.weight != 0 and self.start <= step / max(steps, 1) <= self.end

    def prepare(self, latent_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> "PreparedControl":
        """The hint at 8 x `latent_size` (the source's pixel size) on the source's device, once per pass."""
        hint = crop_and_resize(self.image.float(), latent_size[0] * 8, latent_size[1] * 8)
        return PreparedControl(self.net.model, hint.to(device=device, dtype=dtype), self.mode, self.weight)


class PreparedControl:
    """The per-forward part: run the ControlNet on some rows of the UNet's batch, scale its residuals."""

    def __init__(self, model: torch.nn.Module, hint: torch.Tensor, mode: str, weight: float) -> None:
        self.model = model
        self.hint = hint
        self.mode = mode
        self.weight = weight
        self._scales: list[float] | None = None

    def rows(self, first: int, branches: int, batch: int) -> slice:
        """The controlled rows of a batch whose branches `first`.. `branches - 1` (each `batch` rows)
        are the adapted ones, uncond before cond: all of them, or the cond branch alone in "control"."""
        if self.mode == "control":
            first = branches - 1
        return slice(first * batch, branches * batch)

    def for_rows(self, rows: slice) -> "RowControl":
        return RowControl(self, rows)

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                  y: torch.Tensor | None, rows: slice) -> ControlResiduals:
        t = timesteps.reshape(-1).expand(x.shape[0])
        x_rows = x[rows]
        hint = self.hint.expand(x_rows.shape[0], -1, -1, -1)
        out = self.model(x_rows, hint, t[rows], None if context is None else context[rows],
                         None if y is None else y[rows])
        if self._scales is None:
            self._scales = residual_scales(self.mode, self.weight, len(out))
        for residual, scale in zip(out, self._scales):
            if scale != 1.0:
                residual.mul_(scale)   # fresh outputs of the zero convs: scaled in place
        return ControlResiduals(rows, out)


@dataclass(frozen=True)
class RowControl:
    """`PreparedControl` bound to the rows of one forward: the UNet's `control` argument."""

    control: PreparedControl
    rows: slice

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                 y: torch.Tensor | None) -> ControlResiduals:
        return self.control.residuals(x, timesteps, context, y, self.rows)
