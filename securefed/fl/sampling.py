"""Client sampling per round: fixed size m or Poisson rate q, seeded.

Poisson sampling (each client joins independently with probability q) is what
privacy amplification by subsampling assumes for user-level DP-FedAvg
(McMahan et al., ICLR 2018); fixed-size sampling is the common FL default.
The draw is seeded from (run seed, round) for reproducibility. It decides
participation, not secrets, so a seeded NumPy generator is appropriate.
"""

from __future__ import annotations

import numpy as np

from securefed.config import SamplingSection


def sample_clients(n_clients: int, round_index: int, cfg: SamplingSection, seed: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, 7919, round_index])
    if cfg.mode == "poisson":
        chosen = np.flatnonzero(rng.random(n_clients) < cfg.rate)
        return tuple(int(c) for c in chosen)
    m = cfg.clients_per_round or n_clients
    m = min(m, n_clients)
    return tuple(sorted(int(c) for c in rng.choice(n_clients, size=m, replace=False)))


def sample_dropouts(clients: tuple[int, ...], rate: float, stage: str, round_index: int, seed: int) -> dict[int, str]:
    """Each sampled client drops at ``stage`` independently with probability ``rate``."""
    if rate <= 0:
        return {}
    rng = np.random.default_rng([seed, 104729, round_index])
    return {c: stage for c in clients if rng.random() < rate}
