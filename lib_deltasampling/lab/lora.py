"""LoRA training on a runtime UNet, saved in kohya's format (what every WebUI loads).

Rank-r pairs sit beside every Linear of the UNet's transformers (attention q/k/v/out, feed-forward,
linear proj_in/proj_out) as forward hooks: out + up(down(x)) * alpha / r. The base weights stay
frozen. `kohya_tensors` names each pair through the runtime's own `KeyMap.kohya_name`, so the file
loads back through the same adapter code as any downloaded LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime.adapters.keys import KeyMap, Target


def lora_layers(unet: nn.Module) -> list[str]:
    """Names of the Linear layers a LoRA adapts: everything inside the transformer blocks."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and (".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out")))]


class LoraNetwork(nn.Module):
    """Trainable low-rank pairs for `names` of `unet`; `attach()` hooks them in, `detach()` removes them."""

    def __init__(self, unet: nn.Module, names: list[str], rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        self.unet, self.rank, self.alpha = [unet], rank, float(alpha if alpha is not None else rank)
        self.names = names
        modules = dict(unet.named_modules())
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for name in names:
            m = modules[name]
            down = torch.empty(rank, m.in_features, device=m.weight.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device)))
        self._handles: list = []

    def attach(self) -> "LoraNetwork":
        modules = dict(self.unet[0].named_modules())
        scale = self.alpha / self.rank
        for name, down, up in zip(self.names, self.down, self.up):
            def hook(module, args, out, down=down, up=up):
                return out + (args[0] @ down.t() @ up.t()) * scale
            self._handles.append(modules[name].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def kohya_tensors(self, keymap: KeyMap) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, down, up in zip(self.names, self.down, self.up):
            kohya = keymap.kohya_name(Target("unet", name))
            if kohya is None:
                raise ValueError(f"no kohya name for UNet layer {name!r}")
            out[f"{kohya}.lora_down.weight"] = down.detach().to("cpu", torch.float16).contiguous()
            out[f"{kohya}.lora_up.weight"] = up.detach().to("cpu", torch.float16).contiguous()
            out[f"{kohya}.alpha"] = torch.tensor(self.alpha, dtype=torch.float16)
        return out
