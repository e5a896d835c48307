"""ProLoRA: move one layer's weight change from a source base model to a target of the same
architecture, training-free (Farhadzadeh et al., "Zero-Shot Adaptation of Parameter-Efficient
Fine-Tuning in Diffusion Models", ICML 2025; arXiv 2506.04244).

With W = U S Vᵀ, the k leading singular vectors span W's subspace: P_U = U_k U_kᵀ on the output
side, Q_V = V_k V_kᵀ on the input side, and P(X) = P_U X Q_V is the orthogonal projection of a
matrix X onto the subspace pair. The source change dW is split into its part in the source's
subspace and the rest (the null-space part), and each goes to the target's matching space:

    dW_par  = P_s(dW)                    dW_perp = dW - P_s(dW)
    dW_t    = P_t(dW_par)  +  (dW_perp - P_t(dW_perp))

A layer is transferred only where the two subspaces are alike:
Phi = |U_sᵀ U_t|_F² / k on the output side (V on the input side), both >= a threshold (0.8).

Choices made here, stated in the converted file's metadata (the paper's full text was not
available to check them): the null-space part is everything outside the subspace pair, mixed
terms (P_U dW (I - Q_V)) included. The two-sided form U_⊥U_⊥ᵀ dW V_⊥ᵀV_⊥ drops those, which for
a layer whose sides differ in size (a [1280, 320] projection: V_⊥ is empty at full k) loses the
change in the larger side's null space, and breaks the identity case (target = source must give
back dW); with this split it gives back dW exactly, and the two agree where the mixed terms are
zero. Further: k = min(`subspace_rank`, the matrix's smaller side); a layer passes when both
sides' Phi reach the threshold; conv kernels are matrices [out, in * kh * kw]; the transferred
change is re-factored by a truncated SVD.

Plain torch on [out, in] matrices; no projector is formed (P_U X = U (Uᵀ X)), so a 1280x5120
layer costs two thin SVDs and a few products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_THRESHOLD = 0.8
DEFAULT_SUBSPACE_RANK = 320


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear [out, in] as it is, a conv kernel [out, in, kh, kw] as [out, in * kh * kw]."""
    return weight.reshape(weight.shape[0], -1)


@dataclass(frozen=True)
class Subspace:
    """The k leading singular vectors of one weight matrix: u [out, k], v [in, k] (float32)."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def k(self) -> int:
        return self.u.shape[1]

    def project_out(self, x: torch.Tensor) -> torch.Tensor:      # P_U x
        return self.u @ (self.u.T @ x)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:       # x Q_V
        return (x @ self.v) @ self.v.T


def subspace(weight: torch.Tensor, subspace_rank: int = DEFAULT_SUBSPACE_RANK) -> Subspace:
    """The leading min(subspace_rank, min(out, in)) singular vectors of `weight` (any float dtype)."""
    w = as_matrix(weight).float()
    k = max(1, min(subspace_rank, *w.shape))
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return Subspace(u[:, :k].contiguous(), vh[:k].T.contiguous())


def similarity(source: Subspace, target: Subspace) -> tuple[float, float]:
    """(output side, input side) Phi = |Aᵀ B|_F² / k, 1 for the same subspace, k/n for unrelated ones."""
    k = min(source.k, target.k)
    left = float((source.u[:, :k].T @ target.u[:, :k]).square().sum()) / k
    right = float((source.v[:, :k].T @ target.v[:, :k]).square().sum()) / k
    return left, right


def split(delta: torch.Tensor, space: Subspace) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_par, dW_perp) of a [out, in] change: its projection onto the subspace pair, and the rest."""
    par = space.project_in(space.project_out(delta))
    return par, delta - par


def project(delta: torch.Tensor, source: Subspace, target: Subspace) -> torch.Tensor:
    """The source change `delta` (shaped like the weight) moved into the target's spaces, same shape."""
    d = as_matrix(delta).float()
    par, perp = split(d, source)
    moved_par = target.project_in(target.project_out(par))
    moved_perp = perp - target.project_in(target.project_out(perp))
    return (moved_par + moved_perp).reshape(delta.shape)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in*kh*kw]) with up @ down the best rank-r approximation of `delta`
    (truncated SVD, sqrt of the singular values on each side)."""
    d = as_matrix(delta).float()
    r = max(1, min(rank, *d.shape))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()
