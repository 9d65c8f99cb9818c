"""Per-example gradients and their norms from one batched forward/backward.

DP-SGD clips each example's gradient to an L2 norm over *every* trainable
tensor (Abadi et al. 2016). The attack benchmark clips a full 135M-parameter
model's gradient, where one backward per example is the bottleneck and
materialising per-example weight gradients (Opacus' hooks) needs
``B x 135M`` floats. For a linear layer ``y = x Wᵀ (+ b)`` one example's
gradient is a sum over its positions, ``∇W = Σ_t g_t x_tᵀ`` with
``g_t = ∂L/∂y_t``; hooks on the module's input and on its output's gradient
give every example's factors from one batched pass, and the squared norm needs
no ``d_out x d_in`` matrix: ``‖Σ_t g_t x_tᵀ‖² = Σ_{t,s} (g_t·g_s)(x_t·x_s)``,
two ``T x T`` Gram matrices (the "ghost norm": Goodfellow 2015, Li et al.
ICLR 2022, the trick behind Opacus' ghost clipping). An embedding is the same
with one-hot inputs; a tied embedding/output matrix sums both contributions
before the norm (cross terms included); an elementwise scale (RMSNorm,
LayerNorm: ``y = w ⊙ f(x) + b``) has ``∇w = Σ_t g_t ⊙ f(x_t)``, checked
numerically on every call. All of it is exact algebra: the result equals the
per-example loop up to floating-point rounding (tests/test_attack_simulate.py
checks it in float64 against that loop).

Only the tensors asked for (``keep``) are formed per example; the rest enter
the norm alone. Any module that owns a trainable tensor and is not a linear,
embedding or elementwise scale raises ``NotImplementedError``: a wrong norm
would silently weaken the DP being simulated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Per-example losses of a chunk of examples: returns a 1-D tensor, one entry per example.
BatchLossFn = Callable[[nn.Module], torch.Tensor]


@dataclass
class _Factor:
    """Per-example gradients ``Σ_t a_t ⊗ b_t`` of a 2-D weight: ``a`` rows (or row indices, for an
    embedding lookup) and ``b`` rows, per example, zero-gradient positions dropped."""

    shape: tuple[int, ...]
    rows: list[tuple[torch.Tensor, torch.Tensor]]
    indexed: bool  # a holds row indices (embedding) rather than dense rows

    def dense(self, i: int) -> torch.Tensor:
        a, b = self.rows[i]
        if self.indexed:
            return torch.zeros(self.shape, dtype=b.dtype).index_add_(0, a, b)
        return a.T @ b

    def dense_all(self) -> torch.Tensor:
        return torch.stack([self.dense(i) for i in range(len(self.rows))])

    def sqnorms(self) -> torch.Tensor:
        out = torch.zeros(len(self.rows), dtype=torch.float64)
        for i, (a, _) in enumerate(self.rows):
            t = a.shape[0]
            if t == 0:
                continue
            if self.indexed or t * (self.shape[0] + self.shape[1]) < self.shape[0] * self.shape[1]:
                out[i] = _inner(self, i, self, i)
            else:
                out[i] = self.dense(i).double().pow(2).sum()
        return out


def _gram_a(f1: _Factor, a1: torch.Tensor, f2: _Factor, a2: torch.Tensor) -> torch.Tensor:
    if f1.indexed and f2.indexed:
        return (a1[:, None] == a2[None, :]).to(torch.float64)
    if f1.indexed:
        return a2[:, a1].T.double()
    if f2.indexed:
        return a1[:, a2].double()
    return (a1 @ a2.T).double()


def _inner(f1: _Factor, i1: int, f2: _Factor, i2: int) -> torch.Tensor:
    """⟨Σ_t a_t ⊗ b_t, Σ_s c_s ⊗ d_s⟩ = Σ_{t,s} (a_t·c_s)(b_t·d_s)."""
    a1, b1 = f1.rows[i1]
    a2, b2 = f2.rows[i2]
    if a1.shape[0] == 0 or a2.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    return (_gram_a(f1, a1, f2, a2) * (b1 @ b2.T).double()).sum()


_Contribution = _Factor | torch.Tensor  # a _Factor, or dense per-example gradients [k, *shape]


def _sqnorms(c: _Contribution) -> torch.Tensor:
    if isinstance(c, _Factor):
        return c.sqnorms()
    return c.double().pow(2).flatten(1).sum(1)


def _dense(c: _Contribution) -> torch.Tensor:
    return c.dense_all() if isinstance(c, _Factor) else c


class PerExampleGradients:
    """Hooks that collect per-example gradient norms (every trainable tensor) and per-example
    gradients of the ``keep`` tensors during one batched forward/backward."""

    def __init__(self, model: nn.Module, keep: Mapping[str, nn.Parameter]) -> None:
        self.model = model
        trainable = {id(p): p for p in model.parameters() if p.requires_grad}
        self.keep_ids = {id(p) for p in keep.values()}
        if not self.keep_ids <= trainable.keys():
            raise ValueError("every tensor to keep must be trainable (requires_grad)")
        self.owners: dict[int, list[nn.Module]] = {}
        self.kinds: dict[nn.Module, str] = {}
        self.mod_params: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
        for mod in model.modules():
            own = [(a, p) for a, p in mod.named_parameters(recurse=False) if id(p) in trainable]
            if not own:
                continue
            self.kinds[mod] = self._kind(mod, own)
            self.mod_params[mod] = own
            for _, p in own:
                self.owners.setdefault(id(p), []).append(mod)
        self.trainable = trainable
        self.busy = False

    @staticmethod
    def _kind(mod: nn.Module, own: list[tuple[str, nn.Parameter]]) -> str:
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, nn.Embedding):
            if mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse:
                raise NotImplementedError(f"embedding options of {type(mod).__name__} are not supported")
            return "embedding"
        if all(a in ("weight", "bias") and p.ndim == 1 for a, p in own):
            return "scale"  # y = w ⊙ f(x) + b, checked on every call
        raise NotImplementedError(
            f"per-example gradients of {type(mod).__name__} ({', '.join(a for a, _ in own)}) are not supported"
        )

    def run(self, loss_fn: BatchLossFn) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Per-example squared norms [k] (float64) and per-example gradients of the kept tensors."""
        self.calls: dict[nn.Module, int] = dict.fromkeys(self.kinds, 0)
        self.sq: torch.Tensor | None = None
        self.store: dict[int, list[_Contribution]] = {}
        handles = []
        saved = {pid: p.requires_grad for pid, p in self.trainable.items()}
        try:
            # Autograd must not form the batch-summed weight gradients: freeze every weight and
            # let the gradient enter at the input embeddings' output instead.
            for p in self.trainable.values():
                p.requires_grad_(False)
            get_emb = getattr(self.model, "get_input_embeddings", None)
            emb = get_emb() if callable(get_emb) else None
            if not isinstance(emb, nn.Module):
                raise NotImplementedError("the model has no input embedding module to start the backward pass at")
            handles.append(emb.register_forward_hook(self._require_grad))
            for mod in self.kinds:
                handles.append(mod.register_forward_hook(self._forward))
            losses = loss_fn(self.model)
            if losses.ndim != 1:
                raise ValueError("a batched loss must return one loss per example (a 1-D tensor)")
            k = losses.shape[0]
            losses.sum().backward()
        finally:
            for h in handles:
                h.remove()
            for pid, p in self.trainable.items():
                p.requires_grad_(saved[pid])
        sq = torch.zeros(k, dtype=torch.float64) if self.sq is None else self.sq
        kept: dict[int, torch.Tensor] = {}
        for pid, contribs in self.store.items():
            if pid in self.keep_ids or any(not isinstance(c, _Factor) for c in contribs):
                dense = _dense(contribs[0])
                for c in contribs[1:]:
                    dense = dense + _dense(c)
                sq = sq + _sqnorms(dense)
                if pid in self.keep_ids:
                    kept[pid] = dense
            else:
                fs = [c for c in contribs if isinstance(c, _Factor)]
                for i in range(k):
                    sq[i] += sum(_inner(f1, i, f2, i) for f1 in fs for f2 in fs)
        return sq, kept

    def _require_grad(self, mod: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and not output.requires_grad and torch.is_grad_enabled():
            return output.detach().requires_grad_(True)
        return None

    def _forward(self, mod: nn.Module, inputs: Any, output: Any) -> None:
        if self.busy:
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise NotImplementedError(f"{type(mod).__name__}'s output carries no gradient: cannot hook it")
        x = inputs[0]
        kind = self.kinds[mod]
        ctx: torch.Tensor = x.detach()
        if kind == "scale":
            # f(x): the module with unit weight and zero bias; then check y = w ⊙ f(x) + b.
            unit = {a: (torch.ones_like(p) if a == "weight" else torch.zeros_like(p)) for a, p in mod.named_parameters(recurse=False)}
            self.busy = True
            try:
                with torch.no_grad():
                    ctx = torch.func.functional_call(mod, unit, (x.detach(),))
                    full = dict(mod.named_parameters(recurse=False))
                    recon = ctx * full["weight"] if "weight" in full else ctx.clone()
                    if "bias" in full:
                        recon = recon + full["bias"]
            finally:
                self.busy = False
            scale = float(output.detach().abs().max()) or 1.0
            tol = 1e-5 if output.dtype in (torch.float32, torch.float64) else 1e-2
            if float((recon - output.detach()).abs().max()) > tol * scale:
                raise NotImplementedError(f"{type(mod).__name__} is not an elementwise scale w ⊙ f(x) + b")
        self.calls[mod] += 1
        output.register_hook(lambda g, mod=mod, ctx=ctx: self._backward(mod, ctx, g))

    def _backward(self, mod: nn.Module, ctx: torch.Tensor, g: torch.Tensor) -> None:
        kind = self.kinds[mod]
        k = g.shape[0]
        g = g.detach().reshape(k, -1, g.shape[-1])
        for attr, p in self.mod_params[mod]:
            c: _Contribution
            if kind == "linear" and attr == "weight":
                x = ctx.reshape(k, -1, ctx.shape[-1])
                rows = []
                for i in range(k):
                    live = g[i].abs().amax(-1) > 0  # positions without gradient add nothing
                    rows.append((g[i][live], x[i][live]))
                c = _Factor(tuple(p.shape), rows, indexed=False)
            elif kind == "embedding":
                ids = ctx.reshape(k, -1)
                pad = getattr(mod, "padding_idx", None)
                rows = []
                for i in range(k):
                    live = g[i].abs().amax(-1) > 0
                    if pad is not None:
                        live &= ids[i] != pad  # the padding row gets no gradient (torch's rule)
                    rows.append((ids[i][live], g[i][live]))
                c = _Factor(tuple(p.shape), rows, indexed=True)
            elif attr == "bias":
                c = g.sum(1)
            else:  # scale weight
                c = (g * ctx.reshape(k, -1, ctx.shape[-1])).sum(1)
            pid = id(p)
            single = len(self.owners[pid]) == 1 and self.calls[mod] == 1 and pid not in self.keep_ids
            if single:
                self.sq = _sqnorms(c) if self.sq is None else self.sq + _sqnorms(c)
            else:
                self.store.setdefault(pid, []).append(c)
