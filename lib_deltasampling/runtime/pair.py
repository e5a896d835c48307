"""The source pair: a base model and its adapted twin, evaluated together.

Two shapes of "adapted":
- base + adapters (LoRA family): one model, one copy of its weights. All branches run as ONE
  batched forward `[base_uncond, base_cond, adapted_uncond, adapted_cond]` (each x the image
  batch), the adapters adding their part to the adapted rows only (`adapters/apply.py`).
- a fine-tuned checkpoint of the same family (plus optional adapters on it): two models,
  two forwards (base branches, adapted branches).

    pair = SourcePair(base, adapters)                       # or SourcePair(base, adapters, adapted=finetune)
    conds = pair.encode(prompts, negatives, adapted_prompts, adapted_negatives, width=1024, height=1024)
    with pair.running():                                    # hooks on for the generation, off after
        d_bu, d_bc, d_au, d_ac = pair.denoise(x, sigma, conds)

Conditioning is encoded once per generation and kept batched; per step only `x` and `sigma`
are repeated. Adapter text-encoder parts apply to the adapted prompts only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .adapters.apply import AdapterSet
from .control import PreparedControl
from .image_prompt import ImagePromptHooks
from .model import Cond, SourceModel
from .text.encode import Conditioning, EmbeddingVectors


@dataclass(frozen=True)
class PairConditioning:
    """Encoded branches for one image batch; `base`/`adapted` each hold [uncond, cond] or [cond]."""

    base: Cond            # branches concatenated along the batch: rows [branch0 x B, branch1 x B]
    adapted: Cond
    n_base: int
    n_adapted: int
    batch: int            # images per batch (B)
    joint: Cond | None    # base then adapted, for the single forward of a shared model

    @property
    def branches(self) -> int:
        return self.n_base + self.n_adapted


def _cat_conds(conds: Sequence[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class SourcePair:
    def __init__(self, base: SourceModel, adapters: AdapterSet | None = None,
                 adapted: SourceModel | None = None, image_prompt: ImagePromptHooks | None = None) -> None:
        if adapted is not None and adapted.family is not base.family:
            raise ModelFileError(adapted.info.path or "adapted checkpoint",
                                 f"is {adapted.family.label} but the source base "
                                 f"{base.info.path.name if base.info.path else ''} is {base.family.label}",
                                 "The adapted checkpoint must be a fine-tune of the same family as the source base")
        self.base = base
        self.adapted = adapted
        self.adapters = adapters
        self.image_prompt = image_prompt   # an IP-Adapter on the adapted rows (runtime/image_prompt.py)

    @property
    def shared(self) -> bool:
        """Base and adapted share one model (adapters only): one batched forward."""
        return self.adapted is None

    @property
    def adapted_model(self) -> SourceModel:
        return self.adapted or self.base

    def text_to(self, device: torch.device) -> None:
        """Move the text encoders of both models (see `SourceModel.text_to`)."""
        for model in {id(m): m for m in (self.base, self.adapted_model)}.values():
            model.text_to(device)

    @contextmanager
    def running(self) -> Iterator["SourcePair"]:
        """Attach the adapters' hooks for a generation; they are removed on exit, also on error."""
        parts = [p for p in (self.adapters, self.image_prompt) if p is not None]
        try:
            for part in parts:
                part.attach()
            yield self
        finally:
            for part in parts:
                part.detach()

    # ------------------------------------------------------------------ conditioning

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
               adapted_prompts: Sequence[str], adapted_negative_prompts: Sequence[str] | None, *,
               width: int, height: int, embeddings: Mapping[str, EmbeddingVectors] = {},
               adapted_embeddings: Mapping[str, EmbeddingVectors] | None = None) -> PairConditioning:
        """Encode both branches for an image batch (one prompt per image). Negatives None = cond only."""
        batch = len(prompts)
        if len(adapted_prompts) != batch or any(n is not None and len(n) != batch
                                                for n in (negative_prompts, adapted_negative_prompts)):
            raise ValueError("every prompt list needs one entry per image of the batch")
        if (negative_prompts is None) != (adapted_negative_prompts is None):
            raise ValueError("give negative prompts for both branches or for neither")
        adapted_embeddings = embeddings if adapted_embeddings is None else adapted_embeddings

        base_text, adapted_text = self.base.text, self.adapted_model.text
        # Padding uses the empty-prompt encoding without adapters (A1111 computes it at model load).
        base_text.empty_context()
        adapted_text.empty_context()
        base = [self._encode(base_text, negative_prompts, True, embeddings)] if negative_prompts is not None else []
        base.append(self._encode(base_text, prompts, False, embeddings))
        with self.adapters.applied() if self.adapters else nullcontext():
            adapted = ([self._encode(adapted_text, adapted_negative_prompts, True, adapted_embeddings)]
                       if adapted_negative_prompts is not None else [])
            adapted.append(self._encode(adapted_text, adapted_prompts, False, adapted_embeddings))

        # One forward needs one token length: pad with empty-prompt chunks (A1111's "pad prompt/negative prompt").
        chunks = max(c.context.shape[1] // 77 for c in base + adapted)
        base_conds = [self.base.cond_from(base_text.pad_to_chunks(c, chunks), width=width, height=height)
                      for c in base]
        adapted_conds = [self.adapted_model.cond_from(adapted_text.pad_to_chunks(c, chunks), width=width, height=height)
                         for c in adapted]
        joint = _cat_conds(base_conds + adapted_conds) if self.shared else None
        if self.image_prompt is not None:
            self.image_prompt.prepare(batch=batch, with_uncond=adapted_negative_prompts is not None)
        return PairConditioning(_cat_conds(base_conds), _cat_conds(adapted_conds), len(base_conds),
                                len(adapted_conds), batch, joint)

    @staticmethod
    def _encode(text, prompts: Sequence[str], negative: bool, embeddings) -> Conditioning:
        return text.encode(list(prompts), embeddings, negative=negative)

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: PairConditioning,
                control: PreparedControl | None = None) -> tuple[torch.Tensor, ...]:
        """Denoised latents per branch, in order [base_uncond, base_cond, adapted_uncond, adapted_cond]
        (without the uncond entries when encoded cond-only). `x` [B, C, H, W], `sigma` [B].
        `control`: a ControlNet applied to the adapted branches only (runtime/control.py)."""
        if self.adapters is not None and self.adapters.adapters and not self.adapters.attached:
            raise RuntimeError("SourcePair.denoise must run inside `with pair.running():`")
        b = conds.batch
        if self.shared:
            n = conds.branches
            x_in, s_in = x.repeat(n, *([1] * (x.ndim - 1))), sigma.repeat(n)
            self._set_rows(slice(conds.n_base * b, n * b))
            rows = control.for_rows(control.rows(conds.n_base, n, b)) if control is not None else None
            try:
                out = self.base.denoise(x_in, s_in, conds.joint, rows)
            finally:
                self._set_rows(None)
            return out.chunk(n)
        base = self.base.denoise(x.repeat(conds.n_base, *([1] * (x.ndim - 1))), sigma.repeat(conds.n_base), conds.base)
        self._set_rows(slice(None))
        try:
            rows = control.for_rows(control.rows(0, conds.n_adapted, b)) if control is not None else None
            adapted = self.adapted.denoise(x.repeat(conds.n_adapted, *([1] * (x.ndim - 1))),
                                           sigma.repeat(conds.n_adapted), conds.adapted, rows)
        finally:
            self._set_rows(None)
        return (*base.chunk(conds.n_base), *adapted.chunk(conds.n_adapted))

    def _set_rows(self, rows: slice | None) -> None:
        """The adapted rows of the next forward, for the adapters' and the image prompt's hooks."""
        for part in (self.adapters, self.image_prompt):
            if part is not None:
                part.rows = rows
