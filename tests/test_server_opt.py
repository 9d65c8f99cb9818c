"""Server optimizers against hand computations, through the real plaintext aggregator."""

from __future__ import annotations

import numpy as np

from securefed.config import ServerSection
from securefed.fl.server_opt import FedAdaptive, FedAvg
from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, ClientInput


def _aggregate(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    agg = AGGREGATORS.create("plaintext")
    inputs = {i: ClientInput(d.astype(np.float32), w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))}
    res = run_round(agg.new_round(1, inputs), agg.stages).result
    return res.total / res.total_weight


def test_weighted_fedavg_is_the_hand_computed_mean() -> None:
    d = [np.array([1.0, 2.0, -3.0]), np.array([3.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5])]
    w = [10.0, 30.0, 60.0]
    avg = _aggregate(d, w)
    # (10*[1,2,-3] + 30*[3,0,1] + 60*[.5,.5,.5]) / 100 = [1.3, 0.5, 0.3]
    np.testing.assert_allclose(avg, [1.3, 0.5, 0.3], rtol=1e-6)
    x = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(FedAvg(ServerSection()).step(x, avg), [1.3, 1.5, 2.3], rtol=1e-6)


def test_unweighted_fedavg_ignores_example_counts() -> None:
    avg = _aggregate([np.array([1.0, 0.0]), np.array([0.0, 4.0])], [1.0, 1.0])
    np.testing.assert_allclose(avg, [0.5, 2.0])


def test_fedadam_step_by_hand() -> None:
    cfg = ServerSection(optimizer="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = FedAdaptive(cfg, yogi=False)
    x = np.array([1.0, -1.0], dtype=np.float32)
    d1 = np.array([0.2, -0.4])
    x1 = opt.step(x, d1)
    m = 0.1 * d1
    v = 0.99 * 1e-6 + 0.01 * d1**2
    np.testing.assert_allclose(x1, x + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    d2 = np.array([-0.1, 0.1])
    x2 = opt.step(x1, d2)
    m = 0.9 * m + 0.1 * d2
    v = 0.99 * v + 0.01 * d2**2
    np.testing.assert_allclose(x2, x1 + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_fedyogi_second_moment_by_hand() -> None:
    cfg = ServerSection(optimizer="fedyogi", lr=0.1, beta1=0.0, beta2=0.5, tau=0.1)
    opt = FedAdaptive(cfg, yogi=True)
    d = np.array([1.0])
    x1 = opt.step(np.zeros(1, dtype=np.float32), d)
    v = 0.01 - 0.5 * 1.0 * np.sign(0.01 - 1.0)  # = 0.51
    np.testing.assert_allclose(x1, 0.1 * 1.0 / (np.sqrt(v) + 0.1), rtol=1e-5)
