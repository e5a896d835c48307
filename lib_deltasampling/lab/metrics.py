"""Metrics that need nothing from a hub: a small classifier trained on the world's own images.

One CNN with a head per label (`world.HEADS`): layout, each object's shape and colour, background,
style. From its outputs, for images generated from prompts (`Scene`s):
- content accuracy: the fraction of the prompt's content labels (`world.CONTENT_HEADS`) it reads back;
- style score: the mean probability of "stripes";
- concept score: the mean probability that the first object is a zorb.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world
from .minis import pixels


class Classifier(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout in ((3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)):   # 64 -> 4
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(4 * w * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in world.HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, 3, 64, 64] in [-1, 1] -> logits per head."""
        h = self.hidden(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] (or float [B, 3, H, W] in [-1, 1]) -> float [B, 3, 64, 64] in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = pixels(images)
    images = images.to(device, torch.float32)
    if images.shape[-1] != 64:
        images = F.interpolate(images, size=(64, 64), mode="area" if images.shape[-1] > 64 else "bilinear")
    return images


def label_tensors(scenes: list[world.Scene], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    labels = [s.labels() for s in scenes]
    return {name: torch.tensor([lab[name] for lab in labels], device=device) for name in world.HEADS}


@torch.no_grad()
def evaluate(classifier: Classifier, images: np.ndarray | torch.Tensor, scenes: list[world.Scene]) -> dict[str, float]:
    """content accuracy, style score and concept score of `images` generated for `scenes` (their prompts)."""
    device = next(classifier.parameters()).device
    logits = classifier(to_input(images, device))
    labels = label_tensors(scenes, device)
    correct = torch.stack([(logits[h].argmax(1) == labels[h]).float() for h in world.CONTENT_HEADS], 1)
    style = logits["style"].softmax(1)[:, world.STYLES.index("stripes")]
    zorb = logits["shape1"].softmax(1)[:, world.SHAPES.index("zorb")]
    return {"content": float(correct.mean()), "style": float(style.mean()), "concept": float(zorb.mean())}
