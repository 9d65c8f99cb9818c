"""Sample-level DP-SGD on PEFT adapters, with Opacus.

DP-SGD (Abadi et al., CCS 2016): each step samples a batch by Poisson sampling
(every example joins independently with probability q = B / n), clips each
example's gradient to L2 norm C, sums, adds N(0, (sigma C)^2 I) and divides by
the *expected* batch size B. Only the trainable adapter tensors get gradients,
so only they are clipped and noised; the frozen base model is public.

Per-sample gradients come from Opacus (Yousefpour et al. 2021) in one of three
grad-sample modes, each checked against a by-hand oracle
(:mod:`securefed.privacy.oracle`, ``tests/test_privacy_oracle.py``):

* ``hooks``: module hooks materialise per-sample gradients;
* ``functorch``: ``torch.func`` vmap over every trainable layer;
* ``ghost``: ghost clipping (Li et al., ICLR 2022; Bu et al. 2023): per-sample
  *norms* only, then a second backward pass on the re-weighted loss.

PEFT methods that fail the oracle are refused under DP
(:func:`check_dp_support`): prompt tuning silently clips one batch-summed
gradient (peft's ``get_prompt`` repeats one prompt lookup across the batch),
IA3's scaling vectors never receive a per-sample gradient, and prefix tuning
errors in ghost mode (environment-and-assets.md §2.1).

Noise and Poisson sampling come from a :class:`NoiseSource` (the CSPRNG in
secure mode), not from Opacus's generator, so secure mode works without
torchcsprng. Opacus's own data loader and accountant are not used: the DP
event returned by :func:`train_dp_sgd` is recorded in the privacy ledger.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from .errors import UnsupportedMethodError
from .events import DpEvent, dp_sgd_event
from .secure_noise import NoiseSource, bernoulli

Mode = Literal["hooks", "functorch", "ghost"]
MODES: tuple[Mode, ...] = ("hooks", "functorch", "ghost")
Example = TypeVar("Example")

#: PEFT type -> grad-sample modes that pass the per-sample oracle (peft 0.21, opacus 1.6).
SUPPORTED_MODES: dict[str, frozenset[str]] = {
    "LORA": frozenset(MODES),
    "PREFIX_TUNING": frozenset({"hooks", "functorch"}),
}
#: Why the others are refused (mode-independent).
REFUSED: dict[str, str] = {
    "PROMPT_TUNING": (
        "prompt tuning fails the per-sample gradient oracle: peft's PeftModel.get_prompt encodes "
        "prompt_tokens[:1] once and repeats it across the batch, so Opacus sees a single gradient for "
        "the whole batch and clips it once. Training would run and report an epsilon that does not "
        "hold. Use LoRA (or prefix tuning with mode hooks/functorch) under DP."
    ),
    "IA3": (
        "IA3 fails the per-sample gradient oracle: its scaling vectors live in a ParameterDict that no "
        "module hook sees, so Opacus gets no per-sample gradient for them (\"Per sample gradient is not "
        "initialized\"). Use LoRA under DP."
    ),
}
_GHOST_PREFIX = (
    "prefix tuning errors in ghost mode (Opacus's embedding norm sampler calls .view on a "
    "non-contiguous tensor); use mode = \"hooks\" or \"functorch\""
)


def _peft_types(model: nn.Module) -> set[str]:
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict):
        return set()
    out = set()
    for cfg in cfgs.values():
        t = getattr(cfg, "peft_type", None)
        out.add(str(getattr(t, "value", t)).upper())
    return out


def _normalise(method: str) -> str:
    return method.strip().upper().replace("-", "_").replace(" ", "_")


def check_dp_support(model: nn.Module, mode: str, *, method: str | None = None) -> None:
    """Refuse a model/method/mode that fails the per-sample oracle.

    The PEFT types are read from the model itself (``peft_config``), so a
    registry name cannot hide what is really attached; ``method`` (a registry
    name such as ``"prompt-tuning"``) is checked too.

    Raises:
        UnsupportedMethodError: the method or mode is known to fail, or is not verified.
    """
    if mode not in MODES:
        raise UnsupportedMethodError(f"unknown grad-sample mode {mode!r}; use one of {MODES}")
    kinds = _peft_types(model)
    if method is not None:
        name = _normalise(method)
        alias = {"PROMPT": "PROMPT_TUNING", "PREFIX": "PREFIX_TUNING"}.get(name, name)
        if alias in REFUSED:
            kinds.add(alias)
    for kind in sorted(kinds):
        if kind in REFUSED:
            raise UnsupportedMethodError(f"refused under DP: {REFUSED[kind]}")
        if kind not in SUPPORTED_MODES:
            raise UnsupportedMethodError(
                f"PEFT type {kind} has not been checked against the per-sample oracle, so DP-SGD refuses "
                "it; run securefed.privacy.oracle.check_against_oracle on it and add it to SUPPORTED_MODES"
            )
        if mode not in SUPPORTED_MODES[kind]:
            detail = _GHOST_PREFIX if kind == "PREFIX_TUNING" else f"use one of {sorted(SUPPORTED_MODES[kind])}"
            raise UnsupportedMethodError(f"{kind} is refused in grad-sample mode {mode!r}: {detail}")
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedMethodError("the model has no trainable tensors; attach an adapter first")


class _SourcedNoise:
    """Replaces Opacus's noise draw with one from a :class:`NoiseSource`."""

    noise_source: NoiseSource
    noise_multiplier: float
    max_grad_norm: float
    params: list[nn.Parameter]

    def add_noise(self) -> None:
        std = float(getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)) * self.max_grad_norm
        for p in self.params:
            summed: torch.Tensor = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            noise = self.noise_source.gaussian(summed.shape, std, dtype=summed.dtype, device=summed.device)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(summed)


class SourcedDPOptimizer(_SourcedNoise, DPOptimizer):
    """Opacus ``DPOptimizer`` (per-sample clipping from ``grad_sample``) with sourced noise."""


class SourcedGhostOptimizer(_SourcedNoise, DPOptimizerFastGradientClipping):
    """Opacus ghost-clipping optimizer with sourced noise."""


@dataclass(frozen=True)
class DPSGDResult:
    """What one client's DP-SGD released, for the ledger.

    Attributes:
        steps: noised steps actually run (each one a release).
        sampling_probability: q = expected batch size / client examples.
        noise_multiplier, clip, mode, secure: the mechanism's parameters.
        batch_sizes: realised Poisson batch sizes (0 = a noise-only step).
        losses: mean per-example loss of each non-empty batch.
    """

    steps: int
    sampling_probability: float
    noise_multiplier: float
    clip: float
    mode: str
    secure: bool
    batch_sizes: tuple[int, ...]
    losses: tuple[float, ...]

    @property
    def event(self) -> DpEvent:
        return dp_sgd_event(self.sampling_probability, self.noise_multiplier, self.steps)


def sampling_probability(num_examples: int, expected_batch_size: int) -> float:
    """q = B / n for a client with ``num_examples`` examples (capped at 1)."""
    if num_examples < 1:
        raise ValueError("a client needs at least one example for DP-SGD")
    if expected_batch_size < 1:
        raise ValueError(f"expected batch size must be >= 1, got {expected_batch_size}")
    return min(1.0, expected_batch_size / num_examples)


@contextlib.contextmanager
def private_module(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    mode: Mode,
    clip: float,
    noise_multiplier: float,
    expected_batch_size: int,
    noise: NoiseSource,
) -> Iterator[tuple[nn.Module, DPOptimizer]]:
    """Wrap ``model`` and ``optimizer`` for DP-SGD; always removes Opacus's hooks on exit.

    The module is built with ``loss_reduction="sum"`` (callers backpropagate the
    *sum* of per-example losses), and the optimizer divides the noised sum by
    the expected batch size: the fixed denominator DP-SGD's analysis assumes.
    """
    if mode not in MODES:
        raise UnsupportedMethodError(f"unknown grad-sample mode {mode!r}; use one of {MODES}")
    gsm: GradSampleModule
    opt: DPOptimizer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        if mode == "ghost":
            gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=clip, use_ghost_clipping=True
            )
            opt = SourcedGhostOptimizer(
                optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                expected_batch_size=expected_batch_size, loss_reduction="mean",
            )
        else:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
            opt = SourcedDPOptimizer(
                optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                expected_batch_size=expected_batch_size, loss_reduction="mean",
            )
    opt.noise_source = noise
    try:
        yield gsm, opt
    finally:
        gsm._close()
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
            p.grad = None


def dp_backward(module: nn.Module, optimizer: DPOptimizer, per_example_losses: torch.Tensor, mode: Mode) -> None:
    """Backpropagate a batch for DP: plain sum for hooks/functorch, two-pass for ghost."""
    if per_example_losses.dim() != 1:
        raise ValueError(f"per-example losses must be 1-D [batch], got shape {tuple(per_example_losses.shape)}")
    with warnings.catch_warnings():
        # Frozen inputs (token ids, frozen embeddings) make torch note that full backward hooks
        # fire on outputs only; that is exactly what per-sample gradients of the adapter need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if mode == "ghost":
            DPTensorFastGradientClipping(module, optimizer, per_example_losses, "sum").backward()
        else:
            per_example_losses.sum().backward()


def _noise_only_step(opt: DPOptimizer, base: torch.optim.Optimizer, noise: NoiseSource) -> None:
    """An empty Poisson batch still releases noise: grad = N(0, (sigma C)^2) / B."""
    std = opt.noise_multiplier * opt.max_grad_norm
    for p in opt.params:
        p.grad = noise.gaussian(p.shape, std, dtype=p.dtype, device=p.device) / float(opt.expected_batch_size)
    base.step()
    base.zero_grad(set_to_none=True)


def train_dp_sgd(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    make_batch: Callable[[list[Example]], Any],
    per_example_loss: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    expected_batch_size: int,
    noise_multiplier: float,
    clip: float,
    noise: NoiseSource,
    mode: Mode = "hooks",
    method: str | None = None,
    max_physical_batch: int | None = None,
    before_step: Callable[[int], None] | None = None,
) -> DPSGDResult:
    """Run ``steps`` DP-SGD steps on ``model``'s trainable tensors over one client's ``examples``.

    Args:
        model: a PEFT model whose only trainable tensors are the adapter (in train mode).
        examples: this client's training examples (the sample-level unit).
        make_batch: turns a list of examples into a model batch (e.g. ``Task.batch``).
        per_example_loss: ``(module, batch) -> Tensor[batch]`` (e.g. ``Task.per_example_loss``);
            called with the Opacus-wrapped module.
        optimizer: a torch optimizer over the trainable tensors (SGD, Adam, ...).
        steps: DP-SGD steps to run (each one Poisson batch, one noised update).
        expected_batch_size: B; q = B / len(examples).
        noise_multiplier, clip: sigma and C.
        noise: where noise and sampling come from (:func:`noise_source`).
        mode: Opacus grad-sample mode.
        method: the PEFT registry name, checked against the refusal list.
        max_physical_batch: split larger Poisson batches into chunks of this size
            (gradient accumulation; the guarantee is unchanged).
        before_step: called with the step index before each step (e.g. to set a
            learning-rate schedule; post-processing, so the guarantee is unchanged).

    Returns:
        the steps run and the parameters, whose :attr:`DPSGDResult.event` goes to the ledger.

    Raises:
        UnsupportedMethodError: the PEFT method / mode fails the per-sample oracle.
        ValueError: a non-positive clip, noise, batch size or step count.
    """
    check_dp_support(model, mode, method=method)
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0 under DP, got {noise_multiplier}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if max_physical_batch is not None and max_physical_batch < 1:
        raise ValueError("max_physical_batch must be >= 1")
    q = sampling_probability(len(examples), expected_batch_size)
    model.train()
    sizes: list[int] = []
    losses: list[float] = []
    with private_module(
        model, optimizer, mode=mode, clip=clip, noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size, noise=noise,
    ) as (module, opt):
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            picked = [examples[int(i)] for i in bernoulli(noise, len(examples), q).nonzero()[0]]
            sizes.append(len(picked))
            if not picked:
                _noise_only_step(opt, optimizer, noise)
                continue
            chunk = max_physical_batch or len(picked)
            parts = [picked[i : i + chunk] for i in range(0, len(picked), chunk)]
            total = 0.0
            for j, part in enumerate(parts):
                loss = per_example_loss(module, make_batch(part))
                total += float(loss.detach().sum())
                dp_backward(module, opt, loss, mode)
                if j < len(parts) - 1:
                    opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(total / len(picked))
    return DPSGDResult(
        steps=steps,
        sampling_probability=q,
        noise_multiplier=noise_multiplier,
        clip=clip,
        mode=mode,
        secure=noise.secure,
        batch_sizes=tuple(sizes),
        losses=tuple(losses),
    )
