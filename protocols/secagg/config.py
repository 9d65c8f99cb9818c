"""The validated configuration of a SecAgg run, shared by its clients and server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from ..encoding import FixedPointEncoder
from ..errors import ConfigurationError
from .params import GraphParameters, ThreatModel, check_parameters

#: Ring entries appended after the update: the weight entry and the clipped-count entry.
TAIL_ENTRIES = 2


@dataclass(frozen=True)
class SecAggConfig:
    """Everything both sides of a round agree on before it starts.

    Attributes:
        protocol: registered name (``"secagg"`` or ``"secagg+"``); bound into every key.
        encoder: clip, scale bits, ring size and maximum weight.
        sparse: Harary graph (SecAgg+) instead of the complete graph.
        k: neighbours per client, or ``None`` for the parameter finder.
        threshold: Shamir threshold, or ``None`` for the parameter finder.
        model: the threat model the finder and the threshold check use.
        authenticated: signed keys and a consistency round (semi-malicious server).
        threads: worker threads for mask expansion (results do not depend on it).
        max_clients: refuse rounds with more sampled clients than this.
    """

    protocol: str
    encoder: FixedPointEncoder
    sparse: bool
    k: int | None
    threshold: int | None
    model: ThreatModel
    authenticated: bool = False
    threads: int = 1
    max_clients: int | None = None

    def __post_init__(self) -> None:
        if self.authenticated != self.model.semi_malicious:
            raise ConfigurationError("the threat model must be semi-malicious exactly when authenticated")
        if not 1 <= self.threads <= 64:
            raise ConfigurationError(f"threads must be in 1..64, got {self.threads}")

    def parameters(self, n: int) -> GraphParameters:
        """The graph degree and threshold for a round of ``n`` sampled clients."""
        if self.max_clients is not None and n > self.max_clients:
            raise ConfigurationError(f"{n} clients sampled but max_clients={self.max_clients}")
        return _parameters(n, self.model, self.k, self.threshold, self.sparse)

    def decoder_client_bound(self) -> int:
        """Largest id list a client accepts before it knows the round's size."""
        return self.max_clients if self.max_clients is not None else 1 << 20

    def count_cap(self, n: int) -> int:
        """Largest clipped count one client reports, so that ``n`` counts cannot wrap."""
        return ((1 << self.encoder.modulus_bits) - 1) // max(n, 1)


@lru_cache(maxsize=256)
def _parameters(n: int, model: ThreatModel, k: int | None, t: int | None, sparse: bool) -> GraphParameters:
    return check_parameters(n, model, k=k, threshold=t, sparse=sparse)


@dataclass
class Stopwatch:
    """Accumulated wall-clock and process-CPU seconds per named phase (for benchmarks).

    CPU time is what a phase costs on a machine shared with other load; wall
    time is what a user waits.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + time.process_time() - c0
