"""The per-sample oracle: DP-SGD's clipped gradient sum, computed the slow, obvious way.

Per-sample gradients are where DP-SGD implementations go wrong silently: a
layer whose ``grad_sample`` is really a batch sum (peft prompt tuning under
Opacus) trains normally and reports an epsilon that does not hold. So we do
not assume Opacus is right for a given PEFT method; we check it.

The oracle takes each example *alone*, computes its gradient with plain
autograd, clips it to norm C (``g * min(1, C / ||g||)``) and sums. Opacus's
clipped sum for the same batch comes from one DP step with zero noise through
the same code the trainer uses (:func:`securefed.privacy.dp_sgd.private_module`).
Run both in float64 on a model without dropout and they agree to ~1e-6
relative (the residual is Opacus's ``+1e-6`` in ``C / (||g|| + 1e-6)``); the
failures this catches are O(0.1-1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import OracleMismatchError
from .secure_noise import FastNoise

Example = TypeVar("Example")

#: Default relative tolerance: 100x the float64 residual, 1000x below a real failure.
DEFAULT_TOLERANCE = 1e-4


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def clipped_sum_oracle(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    make_batch: Callable[[list[Example]], Any],
    per_example_loss: Callable[[nn.Module, Any], torch.Tensor],
    clip: float,
    norms: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Sum over examples of each example's own gradient, clipped to L2 norm ``clip``.

    If ``norms`` is given, each example's unclipped gradient norm is appended to it.
    """
    named = trainable(model)
    params = [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    for ex in examples:
        loss = per_example_loss(model, make_batch([ex])).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
        norm = torch.sqrt(torch.stack([(g.double() ** 2).sum() for g in grads]).sum())
        if norms is not None:
            norms.append(float(norm))
        factor = min(1.0, clip / float(norm)) if float(norm) > 0 else 1.0
        for t, g in zip(total, grads, strict=True):
            t.add_(g, alpha=factor)
    return {n: t for (n, _), t in zip(named, total, strict=True)}


def opacus_clipped_sum(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    make_batch: Callable[[list[Example]], Any],
    per_example_loss: Callable[[nn.Module, Any], torch.Tensor],
    clip: float,
    mode: str,
) -> dict[str, torch.Tensor]:
    """Opacus's clipped per-sample gradient sum for one batch (noise 0, parameters unchanged)."""
    from .dp_sgd import dp_backward, private_module

    named = trainable(model)
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    base = torch.optim.SGD(params, lr=0.0)
    out: dict[str, torch.Tensor] = {}
    with private_module(
        model, base, mode=mode,  # type: ignore[arg-type]
        clip=clip, noise_multiplier=0.0, expected_batch_size=1, noise=FastNoise(0),
    ) as (module, opt):
        loss = per_example_loss(module, make_batch(list(examples)))
        dp_backward(module, opt, loss, mode)  # type: ignore[arg-type]
        opt.pre_step()  # clip, accumulate, add zero noise, divide by expected batch size 1
        for n, p in named:
            assert p.grad is not None
            out[n] = p.grad.detach().clone()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    return out


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max |got - want| / max |want| over all tensors."""
    if set(got) != set(want):
        raise OracleMismatchError(f"tensor names differ: {sorted(set(got) ^ set(want))[:4]}")
    scale = max(float(w.abs().max()) for w in want.values()) if want else 0.0
    diff = max(float((got[n].double() - want[n].double()).abs().max()) for n in want) if want else 0.0
    return diff / scale if scale > 0 else diff


def check_against_oracle(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    make_batch: Callable[[list[Example]], Any],
    per_example_loss: Callable[[nn.Module, Any], torch.Tensor],
    clip: float,
    mode: str,
    tolerance: float = DEFAULT_TOLERANCE,
    norms: list[float] | None = None,
) -> float:
    """Compare Opacus with the oracle; return the relative error.

    Use a model without dropout (random masks differ between the two passes)
    and preferably float64; pick ``clip`` below the per-example norms so that
    clipping is exercised.

    Raises:
        OracleMismatchError: the error exceeds ``tolerance``: this method/mode must not run under DP.
    """
    want = clipped_sum_oracle(
        model, examples, make_batch=make_batch, per_example_loss=per_example_loss, clip=clip, norms=norms
    )
    got = opacus_clipped_sum(
        model, examples, make_batch=make_batch, per_example_loss=per_example_loss, clip=clip, mode=mode
    )
    err = relative_error(got, want)
    if not err <= tolerance:
        raise OracleMismatchError(
            f"Opacus ({mode}) clipped per-sample gradient sum differs from the by-hand oracle by {err:.3g} "
            f"(relative; tolerance {tolerance:g}): per-sample clipping is wrong for this model, refuse it under DP"
        )
    return err
