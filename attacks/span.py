"""Row-span tests: is a vector a linear combination of a layer's inputs?

For a linear layer ``Y = X Wᵀ`` the weight gradient is ``∇W = (∂L/∂Y)ᵀ X``:
each of its rows is a combination of the n input rows ``x_t`` (one per token
position), so for ``n < d`` its row space *is* ``span{x_t}`` (generically) and
its rank is n. A candidate input ``v`` was in the batch iff its distance to
that row space is ~0 (DAGER, Petrov et al., NeurIPS 2024;
attacks-and-auditing.md §1.1d). A LoRA ``∇A = s·Bᵀ(∂L/∂Y)ᵀ X`` has the same
row space capped at rank r; ``∇B = s·(∂L/∂Y)ᵀ (X Aᵀ)`` spans ``{A x_t}`` in ℝʳ.

The rank is read off the singular values: the largest drop (in decades)
separates the signal from float round-off. A span that fills (nearly) the whole
space (rank ≥ d − ``cutoff``) accepts everything and is flagged ``full``; a
rank equal to the number of rows stacked (no drop) is flagged ``saturated``:
the inputs may outnumber what the gradient can carry (LoRA's rank-r cap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: DAGER's default: a span within this many dimensions of the space is uninformative.
DEFAULT_CUTOFF = 20
#: The least drop (decades of singular value) that counts as the end of the signal.
MIN_GAP_DECADES = 1.5


@dataclass(frozen=True)
class SpanBasis:
    """An orthonormal basis of a gradient's row space, and of its complement.

    Attributes:
        basis: ``dim x rank`` orthonormal columns spanning the row space.
        complement: ``dim x (dim - rank)`` orthonormal columns of the rest.
        rank: the estimated rank.
        dim: the input dimension.
        rows: how many rows were stacked to estimate it.
        gap: the drop (decades) at the rank cut; ``0`` when there was none.
        full: the span leaves fewer than ``cutoff`` dimensions: uninformative.
        saturated: no drop was found below the stacked row count: the inputs may
            outnumber what the gradient carries.
    """

    basis: torch.Tensor
    complement: torch.Tensor
    rank: int
    dim: int
    rows: int
    gap: float
    full: bool
    saturated: bool

    @classmethod
    def from_rows(
        cls,
        matrices: Sequence[torch.Tensor],
        *,
        rank: int | None = None,
        cutoff: int = DEFAULT_CUTOFF,
        min_gap: float = MIN_GAP_DECADES,
        floor_factor: float | None = None,
    ) -> SpanBasis:
        """The common row space of ``matrices`` (each ``rows_i x dim``), each scaled to unit norm.

        ``floor_factor`` switches the rank rule from "largest drop" to "every
        singular value above ``floor_factor`` x the noise floor" (the median of
        the smaller half of the spectrum). FedAvg updates need it: gradients taken
        at drifting weights add weak directions with no clean drop before the floor.
        """
        mats = [m.to(torch.float64) for m in matrices if m is not None and m.numel()]
        if not mats:
            raise ValueError("no gradient matrix to take a span of")
        dim = mats[0].shape[1]
        if any(m.shape[1] != dim for m in mats):
            raise ValueError("matrices of one span must share their column count")
        norms = [float(m.norm()) for m in mats]
        stacked = torch.cat([m / n for m, n in zip(mats, norms, strict=True) if n > 0], 0) if any(norms) else mats[0]
        rows = stacked.shape[0]
        if not any(norms):
            return cls(torch.zeros(dim, 0, dtype=torch.float64), torch.eye(dim, dtype=torch.float64), 0, dim, rows, 0.0, False, False)
        # The spectrum through the Gram matrix (dim x dim): one GEMM and a small
        # symmetric eigensolver, far cheaper than an SVD of the tall stack and
        # robust to CPU contention. Eigenvalues are s^2, so the float64 floor sits
        # at s ~ 1e-8 x s_max, well below the signal of a float32 gradient.
        lam, vecs = torch.linalg.eigh(stacked.T @ stacked)
        lam, vecs = lam.flip(0).clamp_min(0.0), vecs.flip(1)
        s = lam[: min(rows, dim)].sqrt()
        vh = vecs.T
        gap = 0.0
        if rank is None and floor_factor is not None:
            floor = float(s[s.shape[0] // 2 :].median()) if s.shape[0] > 1 else 0.0
            rank = int((s > floor_factor * floor).sum()) if floor > 0 else int((s > 0).sum())
        elif rank is None:
            rank, gap = estimate_rank(s, min_gap=min_gap)
        rank = max(0, min(rank, s.shape[0]))
        return cls(
            basis=vh[:rank].T.contiguous(),
            complement=vh[rank:].T.contiguous(),
            rank=rank,
            dim=dim,
            rows=rows,
            gap=gap,
            full=rank >= dim - cutoff,
            saturated=rank >= min(rows, dim) and gap == 0.0,
        )

    def distance(self, y: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Relative distance ``||v̂ − P v̂||`` of each row of ``y`` to the span (0 = inside)."""
        y = y.to(dtype)
        norm = y.norm(dim=-1, keepdim=True)
        yn = y / norm.clamp_min(torch.finfo(dtype).tiny)
        if self.rank == 0:
            return torch.ones(y.shape[:-1], dtype=dtype)
        # Through the complement: 1 - ||P v||^2 would lose half the digits (sqrt(eps) ~ 1e-8).
        dist = (yn @ self.complement.to(dtype)).norm(dim=-1)
        # A zero vector (e.g. a padding embedding) has no direction: never "inside".
        return torch.where(norm.squeeze(-1) > 0, dist, torch.ones_like(dist))


def estimate_rank(singular_values: torch.Tensor, *, min_gap: float = MIN_GAP_DECADES) -> tuple[int, float]:
    """The rank at the largest drop of the singular values, and that drop in decades.

    Returns ``(len(s), 0.0)`` (no drop: full row rank) when no drop reaches ``min_gap``.
    """
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, 0.0
    # Below ~1e-10 of the top the Gram route is round-off: treat it as one floor.
    logs = torch.log10((s / s[0]).clamp_min(1e-10))
    if s.numel() == 1:
        return 1, 0.0
    gaps = logs[:-1] - logs[1:]
    i = int(torch.argmax(gaps))
    g = float(gaps[i])
    if g < min_gap:
        return int(s.numel()), 0.0
    return i + 1, g
