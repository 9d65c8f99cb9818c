"""Helpers shared by the SecAgg tests (imported by the other ``test_secagg_*`` files), plus their own checks.

``Stepper`` drives one round by hand, stage by stage, so tests can tamper
with, replay or reorder messages between parties. ``exact_inputs`` builds
updates whose fixed-point encoding is deterministic (every entry is a multiple
of ``2^-f`` and weights are integers), so the exact plaintext sum is an oracle
for the unmasked result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, ClientInput, Message
from securefed.protocols.secagg import SecAggAggregator, SecAggRound

SCALE_BITS = 16


def exact_inputs(rng: np.random.Generator, n: int, d: int, *, max_weight: int = 1, ids: list[int] | None = None) -> dict[int, ClientInput]:
    """Updates in (-0.5, 0.5) on the 2^-16 grid, integer weights: encoding is exact."""
    ids = ids if ids is not None else list(range(n))
    out = {}
    for c in ids:
        ints = rng.integers(-(1 << 15), 1 << 15, size=d)
        w = float(rng.integers(1, max_weight + 1))
        out[c] = ClientInput((ints * 2.0**-SCALE_BITS).astype(np.float32), weight=w)
    return out


def make(name: str = "secagg+", **options: object) -> SecAggAggregator:
    options.setdefault("scale_bits", SCALE_BITS)
    agg = AGGREGATORS.create(name, **options)
    assert isinstance(agg, SecAggAggregator)
    return agg


def expected_total(inputs: dict[int, ClientInput], contributors: tuple[int, ...]) -> np.ndarray:
    return sum((inputs[c].weight * np.clip(inputs[c].vector.astype(np.float64), -1, 1) for c in contributors),
               np.zeros(next(iter(inputs.values())).vector.shape[0]))


class Stepper:
    """Run a round by hand: ``pending`` holds the server's messages for the current stage."""

    def __init__(self, rnd: SecAggRound) -> None:
        self.rnd = rnd
        self.pending: list[Message] = rnd.server.start()

    def client_replies(self, msgs: list[Message] | None = None, skip: frozenset[int] = frozenset()) -> list[Message]:
        out: list[Message] = []
        for m in self.pending if msgs is None else msgs:
            if m.recipient not in skip:
                out.extend(self.rnd.clients[m.recipient].receive(m))
        return out

    def to_server(self, replies: list[Message]) -> None:
        for m in replies:
            self.rnd.server.receive(m)

    def end(self) -> None:
        self.pending = self.rnd.server.end_stage()

    def stage(self, mutate: Callable[[list[Message]], list[Message]] | None = None,
              skip: frozenset[int] = frozenset()) -> list[Message]:
        """One full stage: clients answer ``pending`` (minus ``skip``), the server takes the replies."""
        replies = self.client_replies(skip=skip)
        if mutate is not None:
            replies = mutate(replies)
        self.to_server(replies)
        self.end()
        return replies


def test_stepper_matches_transport() -> None:
    rng = np.random.default_rng(1)
    inputs = exact_inputs(rng, 8, 5)
    agg = make("secagg+", k=4, corrupt_fraction=0.0)
    a = run_round(agg.new_round(2, inputs), agg.stages).result
    s = Stepper(agg.new_round(2, inputs))
    while not s.rnd.server.finished:
        s.stage()
    b = s.rnd.result()
    assert a.contributors == b.contributors == tuple(range(8))
    np.testing.assert_array_equal(a.total, b.total)
    np.testing.assert_array_equal(a.total, expected_total(inputs, a.contributors))
