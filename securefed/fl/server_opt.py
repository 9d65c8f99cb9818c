"""Server optimizers: how the aggregated delta moves the global adapter.

The aggregation protocol returns ``sum_i w_i delta_i`` and ``sum_i w_i``; the
average pseudo-gradient is their ratio (weighted FedAvg with ``w_i`` = example
count, unweighted with ``w_i`` = 1; DP-FedAvg divides by the *expected* number
of clients instead, which the privacy layer supplies as ``denominator``).

* FedAvg (McMahan et al., AISTATS 2017): ``x <- x + lr * avg``.
* FedAdam / FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
  Algorithm 2): Adam/Yogi moments over the average delta, adaptivity ``tau``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from securefed.config import ServerSection
from securefed.errors import ConfigError


class ServerOptimizer(ABC):
    def __init__(self, cfg: ServerSection) -> None:
        self.cfg = cfg

    @abstractmethod
    def step(self, x: np.ndarray, avg_delta: np.ndarray) -> np.ndarray:
        """Return the new global vector (float32) from ``x`` and the average delta."""

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint so that a resumed run continues exactly (none for FedAvg)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ConfigError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)}",
                              key="server.optimizer")


class FedAvg(ServerOptimizer):
    def step(self, x: np.ndarray, avg_delta: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) + self.cfg.lr * avg_delta).astype(np.float32)


class FedAdaptive(ServerOptimizer):
    """FedAdam (``yogi=False``) and FedYogi (``yogi=True``); no bias correction, as in Reddi et al."""

    def __init__(self, cfg: ServerSection, *, yogi: bool) -> None:
        super().__init__(cfg)
        self.yogi = yogi
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if set(state) not in (set(), {"m", "v"}):
            raise ConfigError(f"checkpoint has server state {sorted(state)}, expected m and v", key="server.optimizer")
        self.m = state["m"].astype(np.float64) if state else None
        self.v = state["v"].astype(np.float64) if state else None

    def step(self, x: np.ndarray, avg_delta: np.ndarray) -> np.ndarray:
        c = self.cfg
        d = avg_delta.astype(np.float64)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(d)
            self.v = np.full_like(d, c.tau**2)
        self.m = c.beta1 * self.m + (1 - c.beta1) * d
        d2 = d * d
        if self.yogi:
            self.v = self.v - (1 - c.beta2) * d2 * np.sign(self.v - d2)
        else:
            self.v = c.beta2 * self.v + (1 - c.beta2) * d2
        return (x.astype(np.float64) + c.lr * self.m / (np.sqrt(self.v) + c.tau)).astype(np.float32)


def make_server_optimizer(cfg: ServerSection) -> ServerOptimizer:
    if cfg.optimizer == "fedavg":
        return FedAvg(cfg)
    if cfg.optimizer in ("fedadam", "fedyogi"):
        return FedAdaptive(cfg, yogi=cfg.optimizer == "fedyogi")
    raise ConfigError(f"unknown server optimizer {cfg.optimizer!r}", key="server.optimizer")
