"""Client-side local training on a shared frozen base model.

All clients of a simulation share *one* base model in memory: a client loads
the global adapter vector into the model's trainable tensors, trains, and
returns ``delta = theta_local - theta_global`` (trainable tensors only, one
flat float32 vector). Nothing else is copied per client, so memory stays flat
as the number of clients grows.

Local training supports a step or epoch budget, SGD/Adam/AdamW, constant /
linear / cosine schedules with warm-up, gradient accumulation, gradient-norm
clipping (non-private), and the FedProx proximal term (Li et al., MLSys 2020).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from securefed.assets.data import Example
from securefed.config import TrainSection
from securefed.errors import DataError, UpdateError
from securefed.peft.registry import PeftMethod
from securefed.peft.spec import AdapterSpec
from securefed.tasks import Task

if TYPE_CHECKING:
    from securefed.privacy.config import SampleDPConfig
    from securefed.privacy.dp_sgd import DPSGDResult
    from securefed.privacy.secure_noise import NoiseSource


@dataclass(frozen=True)
class ClientUpdate:
    """What a client hands to the aggregation protocol."""

    client_id: int
    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def make_optimizer(params: list[torch.Tensor], cfg: TrainSection) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainSection) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def local_steps(n_examples: int, cfg: TrainSection) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * n_examples / (cfg.batch_size * cfg.grad_accum)))
    return cfg.local_steps


def batch_order(n: int, count: int, batch_size: int, seed: tuple[int, ...]) -> list[np.ndarray]:
    """``count`` index batches drawn epoch by epoch from seeded permutations of ``range(n)``.

    A batch never straddles two epochs, so a client with fewer examples than
    ``batch_size`` trains on all of them each step.
    """
    rng = np.random.default_rng(list(seed))
    out: list[np.ndarray] = []
    perm = rng.permutation(n)
    pos = 0
    while len(out) < max(1, count):
        if pos >= n:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos : pos + batch_size])
        pos += batch_size
    return out


class LocalTrainer:
    """Runs a client's local training on the shared model."""

    def __init__(self, model: nn.Module, method: PeftMethod, spec: AdapterSpec, task: Task, cfg: TrainSection,
                 *, seed: int = 0, progress: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.method = method
        self.spec = spec
        self.task = task
        self.cfg = cfg
        self.seed = seed
        self.progress = progress

    def load_global(self, vector: np.ndarray) -> None:
        self.method.load_state(self.model, self.spec.unflatten(vector))

    def _start(self, client_id: int, global_vector: np.ndarray, examples: Sequence[Example]) -> list[torch.Tensor]:
        """Load the global adapter for a client; return its trainable tensors."""
        if not examples:
            raise DataError(f"client {client_id} has no training examples")
        self.load_global(global_vector)
        return list(self.method.trainable_state(self.model).values())

    def current_vector(self) -> np.ndarray:
        return self.spec.flatten(self.method.trainable_state(self.model))

    def train(self, client_id: int, round_index: int, global_vector: np.ndarray,
              examples: Sequence[Example]) -> ClientUpdate:
        """Train from ``global_vector`` on ``examples``; return the delta.

        Raises:
            DataError: the client has no examples.
            UpdateError: training produced NaN/Inf (e.g. a too-high learning rate).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        params = self._start(client_id, global_vector, examples)
        anchor = [p.detach().clone() for p in params] if cfg.fedprox_mu > 0 else []
        opt = make_optimizer(params, cfg)
        steps = local_steps(len(examples), cfg)
        micro = batch_order(len(examples), steps * cfg.grad_accum, cfg.batch_size, (self.seed, round_index, client_id))
        self.model.train()
        losses: list[float] = []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, steps, cfg)
            opt.zero_grad(set_to_none=True)
            for k in range(cfg.grad_accum):
                idx = micro[step * cfg.grad_accum + k]
                batch = self.task.batch([examples[i] for i in idx])
                loss = self.task.per_example_loss(self.model, batch).mean()
                if cfg.fedprox_mu > 0:
                    loss = loss + 0.5 * cfg.fedprox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if self.progress:
                self.progress(1)
        self.model.eval()
        delta = self.current_vector() - global_vector
        if not np.isfinite(delta).all():
            raise UpdateError(f"client {client_id} produced a NaN/Inf update; lower train.lr")
        return ClientUpdate(
            client_id=client_id,
            delta=delta.astype(np.float32),
            num_examples=len(examples),
            metrics={
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "steps": float(steps),
                "train_seconds": time.perf_counter() - t0,
            },
        )

    def train_private(self, client_id: int, round_index: int, global_vector: np.ndarray,
                      examples: Sequence[Example], *, dp: SampleDPConfig, noise_multiplier: float,
                      noise: NoiseSource) -> tuple[ClientUpdate, DPSGDResult]:
        """Sample-level DP-SGD (Abadi et al., CCS 2016) from ``global_vector``; return the delta and the release.

        ``train.local_steps`` Poisson batches of expected size ``train.batch_size``
        (rate q = B / n), per-example clipping to ``dp.clip`` and Gaussian noise
        ``noise_multiplier * dp.clip`` drawn from ``noise``
        (:func:`securefed.privacy.train_dp_sgd`). The learning-rate schedule is
        applied between steps (post-processing). The returned
        :class:`~securefed.privacy.dp_sgd.DPSGDResult` carries the DP event the
        ledger records for this client.

        Raises:
            DataError: the client has no examples.
            UnsupportedMethodError: the PEFT method fails the per-sample oracle in ``dp.mode``.
            UpdateError: training produced NaN/Inf.
        """
        from securefed.privacy.dp_sgd import train_dp_sgd

        t0 = time.perf_counter()
        cfg = self.cfg
        params = self._start(client_id, global_vector, examples)
        opt = make_optimizer(params, cfg)
        steps = cfg.local_steps

        def before_step(step: int) -> None:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, steps, cfg)
            if self.progress and step:
                self.progress(1)

        try:
            res = train_dp_sgd(
                self.model, list(examples), make_batch=self.task.batch, per_example_loss=self.task.per_example_loss,
                optimizer=opt, steps=steps, expected_batch_size=cfg.batch_size, noise_multiplier=noise_multiplier,
                clip=dp.clip, noise=noise, mode=dp.mode, method=self.method.name, before_step=before_step,
            )
        finally:
            self.model.eval()
        if self.progress:
            self.progress(1)
        delta = self.current_vector() - global_vector
        if not np.isfinite(delta).all():
            raise UpdateError(f"client {client_id} produced a NaN/Inf update under DP-SGD; lower train.lr")
        update = ClientUpdate(
            client_id=client_id,
            delta=delta.astype(np.float32),
            num_examples=len(examples),
            metrics={
                "train_loss": float(np.mean(res.losses)) if res.losses else float("nan"),
                "steps": float(steps),
                "train_seconds": time.perf_counter() - t0,
                "mean_batch_size": float(np.mean(res.batch_sizes)) if res.batch_sizes else 0.0,
            },
        )
        return update, res
