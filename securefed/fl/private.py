"""Differential privacy inside the federated loop: the per-round call order, in one place.

The loop (:mod:`securefed.fl.runner`) asks this module four things per round,
in this order, and nothing else touches noise or the ledger:

1. :meth:`LoopPrivacy.sample_clients`: under user-level DP, Poisson client
   sampling at rate q = ``sampling.rate`` drawn from the CSPRNG (DP-FedAvg's
   amplification by sampling assumes the sample is secret and Poisson;
   McMahan et al., ICLR 2018);
2. :meth:`LoopPrivacy.plan`: the budget guard checks the round's planned
   releases (one DP-SGD event per client that will train, one DP-FedAvg event)
   and the ledger records them *before* any client trains or any noise is drawn;
   a round over budget raises :class:`BudgetExceededError` and nothing runs;
3. :meth:`LoopPrivacy.train` / :meth:`LoopPrivacy.client_input`: DP-SGD in
   the client (sample level), then clipping of the client's update to S with
   unit weight (user level);
4. :meth:`LoopPrivacy.release`: the server adds its noise once to the sum and
   divides by the expected number of clients; the ledger commits what was
   actually released; only then does the loop apply the update and write the
   adapter. The ledger is therefore never behind the published model.

Which configurations are refused, and why, is in :func:`check_loop_config`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from securefed.assets.data import Example
from securefed.config import RunConfig
from securefed.errors import ConfigError
from securefed.fl.client import ClientUpdate, LocalTrainer
from securefed.privacy.dp_sgd import DPSGDResult, check_dp_support
from securefed.privacy.events import DpEvent
from securefed.privacy.secure_noise import NoiseSource, noise_source
from securefed.privacy.session import PrivacySession, PrivacySpent, RoundTicket, RunShape
from securefed.privacy.user_level import DPFedAvg, UserRelease, poisson_sample_clients
from securefed.protocols import AggregateResult, ClientInput


def check_loop_config(cfg: RunConfig) -> None:
    """Refuse loop settings that would make the accounting claim something the run does not do.

    Raises:
        ConfigError: naming the key to change.
    """
    dp, tr = cfg.dp, cfg.train
    if dp.user.enabled:
        if cfg.sampling.mode != "poisson":
            raise ConfigError(
                "user-level DP-FedAvg is accounted with Poisson client sampling (privacy amplification by "
                "sampling); set sampling.mode = \"poisson\" and sampling.rate = expected clients / clients",
                key="sampling.mode",
            )
        if cfg.server.weighted:
            raise ConfigError(
                "DP-FedAvg gives every client weight 1 (the sensitivity of the sum is the clip S); "
                "set server.weighted = false",
                key="server.weighted",
            )
    if dp.sample.enabled:
        if tr.local_epochs > 0:
            raise ConfigError(
                "DP-SGD runs a fixed number of Poisson-sampled steps per round; set train.local_epochs = 0 and "
                "use train.local_steps", key="train.local_epochs",
            )
        if tr.grad_accum != 1:
            raise ConfigError(
                "DP-SGD draws its own Poisson batches of expected size train.batch_size; set train.grad_accum = 1",
                key="train.grad_accum",
            )
        if tr.max_grad_norm > 0:
            raise ConfigError(
                "under DP-SGD every example's gradient is clipped to dp.sample.clip; set train.max_grad_norm = 0",
                key="train.max_grad_norm",
            )
        if tr.fedprox_mu > 0:
            raise ConfigError(
                "the FedProx term is not a per-example loss and would be clipped with the examples; "
                "set train.fedprox_mu = 0 under dp.sample", key="train.fedprox_mu",
            )


def run_fingerprint(cfg: RunConfig, train_fingerprint: str, client_sizes: Sequence[int]) -> str:
    """What the guarantee depends on besides the DP config: a resume with other data or training is refused."""
    blob = {
        "model": asdict(cfg.model), "data": asdict(cfg.data), "peft": asdict(cfg.peft), "train": asdict(cfg.train),
        "sampling": asdict(cfg.sampling), "partition": asdict(cfg.partition), "seed": cfg.run.seed,
        "train_fingerprint": train_fingerprint, "client_sizes": list(client_sizes),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RoundRelease:
    """What the server may apply after a committed round."""

    average: np.ndarray | None  # user level: the noised average (every round); None: the loop averages the sum
    spent: PrivacySpent
    info: Mapping[str, Any]


class LoopPrivacy:
    """The privacy state of one run of the loop (see the module docstring for the call order)."""

    def __init__(self, cfg: RunConfig, session: PrivacySession, user: DPFedAvg | None,
                 sample_noise: NoiseSource | None) -> None:
        self.cfg = cfg
        self.session = session
        self.user = user
        self.sample_noise = sample_noise

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, *, model: nn.Module, client_sizes: Sequence[int],
             train_fingerprint: str, resume: bool = False) -> LoopPrivacy:
        """Validate, resolve noise (calibrating target epsilons), and create or reopen the ledger.

        Raises:
            ConfigError: a loop setting the accounting cannot cover.
            UnsupportedMethodError: the PEFT method fails the per-sample oracle.
            CalibrationError, LedgerError: from :meth:`PrivacySession.open`.
        """
        check_loop_config(cfg)
        dp = cfg.dp
        if dp.sample.enabled:
            check_dp_support(model, dp.sample.mode, method=cfg.peft.method)
        n = len(client_sizes)
        expected = cfg.sampling.rate * n if dp.user.enabled else float(n)
        shape = RunShape(tuple(int(s) for s in client_sizes), cfg.train.rounds, expected,
                         cfg.train.local_steps, cfg.train.batch_size)
        session = PrivacySession.open(
            run_dir, dp, shape=shape, run_id=cfg.run.name,
            run_fingerprint=run_fingerprint(cfg, train_fingerprint, client_sizes), resume=resume,
        )
        user = None
        if dp.user.enabled:
            z = session.user_noise_multiplier
            assert z is not None
            user = DPFedAvg(dp.user, noise_multiplier=z, num_clients=n, expected_clients=expected,
                            noise=noise_source(dp.user.secure_mode), clip=session.resume_clip())
        sample_noise = noise_source(dp.sample.secure_mode) if dp.sample.enabled else None
        return cls(cfg, session, user, sample_noise)

    # -- 1. sampling -----------------------------------------------------------------------------
    def sample_clients(self, num_clients: int) -> tuple[int, ...] | None:
        """Poisson-sampled client ids under user-level DP; None: the loop samples as configured."""
        if self.user is None:
            return None
        return poisson_sample_clients(range(num_clients), self.user.sampling_probability, self.user.noise)

    # -- 2. plan -----------------------------------------------------------------------------------
    def plan(self, round_index: int, training: Sequence[int]) -> RoundTicket:
        """Guard and record the round's releases; raises BudgetExceededError before anything runs."""
        sample: dict[int, DpEvent] = {}
        if self.sample_noise is not None:
            sample = {c: self.session.planned_sample_event(c) for c in training}
        user = self.user.round_event() if self.user is not None else None
        return self.session.plan_round(round_index, sample=sample, user=user)

    # -- 3. clients --------------------------------------------------------------------------------
    def train(self, trainer: LocalTrainer, client: int, round_index: int, global_vector: np.ndarray,
              examples: Sequence[Example]) -> tuple[ClientUpdate, DPSGDResult | None]:
        if self.sample_noise is None:
            return trainer.train(client, round_index, global_vector, examples), None
        sigma = self.session.sample_noise_multiplier
        assert sigma is not None
        return trainer.train_private(client, round_index, global_vector, examples, dp=self.cfg.dp.sample,
                                     noise_multiplier=sigma, noise=self.sample_noise)

    def payload_dim(self, dim: int) -> int:
        return self.user.payload_dim(dim) if self.user is not None else dim

    def client_input(self, update: ClientUpdate, weighted: bool) -> ClientInput:
        if self.user is not None:
            return self.user.client_input(update.delta)
        return ClientInput(update.delta, float(update.num_examples) if weighted else 1.0)

    # -- 4. release ----------------------------------------------------------------------------------
    def release(self, ticket: RoundTicket, result: AggregateResult | None, dim: int,
                trained: Mapping[int, DPSGDResult | None]) -> RoundRelease:
        """Noise (user level), commit to the ledger, and say what the server may apply.

        Under user-level DP the server releases a noised average every round,
        also when no update arrived (then the sum is zero): skipping the release
        would reveal that the sample was empty. Every client that trained is
        charged its DP-SGD event, whether or not its update reached the sum.
        """
        released: UserRelease | None = None
        fed = self.user
        if fed is not None:
            total = result if result is not None else AggregateResult(
                total=np.zeros(fed.payload_dim(dim)), total_weight=0.0, contributors=())
            released = fed.release(total, dim)
        sample_events = {c: r.event for c, r in trained.items() if r is not None}
        info: dict[str, Any] = released.info() if released is not None else {}
        spent = self.session.commit_round(
            ticket, sample=sample_events, user=released.event if released is not None else None, info=info)
        if fed is not None and released is not None:
            fed.advance(released)
            return RoundRelease(released.average, spent, info)
        return RoundRelease(None, spent, info)

    def close(self) -> None:
        self.session.close()


def spent_record(spent: PrivacySpent) -> dict[str, Any]:
    """The metrics line's privacy entry: epsilon so far at each level (max over clients at the sample level)."""
    out: dict[str, Any] = {"accountant": spent.accountant}
    if spent.sample is not None:
        out["sample_epsilon"] = spent.sample.epsilon
        out["sample_delta"] = spent.sample.delta
    if spent.user is not None:
        out["user_epsilon"] = spent.user.epsilon
        out["user_delta"] = spent.user.delta
    return out
