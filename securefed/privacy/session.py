"""One run's privacy state: resolved parameters, the ledger, the guard. The loop's entry point.

Call order per round (docs/differential-privacy.md has the full picture)::

    session = PrivacySession.open(run_dir, dp_config, shape=RunShape(...), run_id=..., resume=...)
    sigma, z = session.sample_noise_multiplier, session.user_noise_multiplier
    for r in rounds:
        sampled = poisson_sample_clients(ids, session.client_sampling_rate, noise)      # user DP
        ticket = session.plan_round(r, sample={c: session.planned_sample_event(c) for c in sampled},
                                    user=dpfedavg.round_event())   # guard + ledger; raises if over budget
        ... clients run train_dp_sgd(...) -> DPSGDResult; clip with dpfedavg.client_input(...) ...
        ... aggregate; release = dpfedavg.release(result, dim) ...
        session.commit_round(ticket, sample={c: res.event for c, res in results.items()},
                             user=release.event, info=release.info())
        ... only now apply and publish the new global model ...

Nothing is trained, noised or sent for a round before :meth:`plan_round`
returned, and the model is not released before :meth:`commit_round` returned.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .accountants import ACCOUNTANTS
from .budget import BudgetGuard, LevelEpsilon, level_epsilon
from .calibrate import calibrate_noise_multiplier
from .config import DPConfig
from .errors import LedgerError
from .events import DpEvent, NoOpEvent, SelfComposedEvent, dp_sgd_event
from .ledger import LEDGER_FILE, LedgerHeader, PrivacyLedger, Release
from .user_level import update_noise_multiplier


@dataclass(frozen=True)
class RunShape:
    """The facts about a run that its privacy parameters depend on.

    Attributes:
        client_sizes: training examples per client id (index = client id).
        rounds: planned federated rounds.
        expected_clients: m, the expected clients per round (user-level rate q = m / N).
        local_steps: DP-SGD steps per client per round.
        expected_batch_size: DP-SGD's expected Poisson batch size B.
    """

    client_sizes: tuple[int, ...]
    rounds: int
    expected_clients: float
    local_steps: int = 1
    expected_batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.client_sizes or min(self.client_sizes) < 1:
            raise ValueError("every client needs at least one training example")
        if self.rounds < 1 or self.local_steps < 1 or self.expected_batch_size < 1:
            raise ValueError("rounds, local_steps and expected_batch_size must be >= 1")
        if not 0 < self.expected_clients <= len(self.client_sizes):
            raise ValueError(f"expected_clients must be in (0, {len(self.client_sizes)}]")

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    def sample_rate(self, client: int) -> float:
        return min(1.0, self.expected_batch_size / self.client_sizes[client])


@dataclass(frozen=True)
class RoundTicket:
    """A planned round: its ledger entry and the epsilons it was checked at."""

    seq: int
    round: int
    planned_sample: Mapping[str, DpEvent]
    planned_user: DpEvent | None
    projected_sample: LevelEpsilon | None
    projected_user: LevelEpsilon | None


@dataclass(frozen=True)
class PrivacySpent:
    """Epsilon spent so far at each level (None: level off)."""

    accountant: str
    sample: LevelEpsilon | None
    user: LevelEpsilon | None

    def to_dict(self) -> dict[str, Any]:
        def lv(x: LevelEpsilon | None) -> dict[str, Any] | None:
            return None if x is None else {"epsilon": x.epsilon, "delta": x.delta, "per_subject": dict(x.per_subject)}

        return {"accountant": self.accountant, "sample": lv(self.sample), "user": lv(self.user)}


def _dominated(actual: DpEvent, planned: DpEvent) -> bool:
    if actual == planned or isinstance(actual, NoOpEvent):
        return True
    if isinstance(actual, SelfComposedEvent) and isinstance(planned, SelfComposedEvent):
        return actual.event == planned.event and actual.count <= planned.count
    if isinstance(planned, SelfComposedEvent):
        return actual == planned.event
    return False


class PrivacySession:
    """Resolved DP parameters plus the ledger and the guard of one run."""

    def __init__(self, ledger: PrivacyLedger, config: DPConfig, shape: RunShape, resolved: Mapping[str, Any]) -> None:
        self.ledger = ledger
        self.config = config
        self.shape = shape
        self.resolved = dict(resolved)
        self.interrupted_rounds: list[int] = []
        self.guard = BudgetGuard(
            accountant=config.accountant,
            delta_sample=self.delta_sample,
            delta_user=self.delta_user,
            sample_budget=config.budget.sample_epsilon,
            user_budget=config.budget.user_epsilon,
        )

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def resolve(config: DPConfig, shape: RunShape) -> dict[str, Any]:
        """Deltas and noise multipliers (calibrated when a target epsilon is given).

        The sample-level calibration assumes the worst client: the smallest
        one (largest rate q) taking part in every round.

        Raises:
            CalibrationError: a target epsilon is unreachable over the planned rounds.
        """
        out: dict[str, Any] = {"delta_sample": None, "delta_user": None, "noise_sample": None, "noise_user": None}
        if config.sample.enabled:
            d = config.resolve_delta(min(shape.client_sizes), level="sample")
            out["delta_sample"] = d
            s = config.sample
            out["noise_sample"] = s.noise_multiplier if s.noise_multiplier is not None else calibrate_noise_multiplier(
                float(s.target_epsilon),  # type: ignore[arg-type]
                d,
                sampling_probability=max(shape.sample_rate(c) for c in range(shape.num_clients)),
                steps=shape.rounds * shape.local_steps,
                accountant=config.accountant,
            )
        if config.user.enabled:
            d = config.resolve_delta(shape.num_clients, level="user")
            out["delta_user"] = d
            u = config.user
            out["noise_user"] = u.noise_multiplier if u.noise_multiplier is not None else calibrate_noise_multiplier(
                float(u.target_epsilon),  # type: ignore[arg-type]
                d,
                sampling_probability=shape.expected_clients / shape.num_clients,
                steps=shape.rounds,
                accountant=config.accountant,
            )
        if config.user.enabled and config.user.clipping == "adaptive":
            sigma_b = config.user.count_noise_multiplier
            out["count_noise_user"] = sigma_b if sigma_b is not None else shape.expected_clients / 20.0
            out["update_noise_user"] = update_noise_multiplier(out["noise_user"], out["count_noise_user"])
        return out

    @staticmethod
    def fingerprint(config: DPConfig, shape: RunShape, run_fingerprint: str = "") -> str:
        text = json.dumps([config.fingerprint(), asdict(shape), run_fingerprint], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def open(
        cls,
        run_dir: Path,
        config: DPConfig,
        *,
        shape: RunShape,
        run_id: str,
        run_fingerprint: str = "",
        resume: bool = False,
    ) -> PrivacySession:
        """Create the run's ledger, or (``resume=True``) verify it and restore from it.

        ``run_fingerprint`` should hash whatever else the guarantee depends on
        (model, data, partition); a resume with a different one is refused.

        Raises:
            LedgerMismatchError, LedgerCorruptError: see :meth:`PrivacyLedger.open`.
            LedgerError: a new run would overwrite an existing ledger.
            CalibrationError: a target epsilon is unreachable.
        """
        if not config.enabled:
            raise LedgerError("DP is off in this run's config; there is nothing to account")
        ACCOUNTANTS.create(config.accountant)  # validates the name early
        path = Path(run_dir) / LEDGER_FILE
        fp = cls.fingerprint(config, shape, run_fingerprint)
        if resume:
            ledger = PrivacyLedger.open(path, run_id=run_id, fingerprint=fp)
            resolved = dict(ledger.header.config.get("resolved", {}))
            session = cls(ledger, config, shape, resolved)
            session.interrupted_rounds = ledger.mark_interrupted()
            return session
        resolved = cls.resolve(config, shape)
        header = LedgerHeader(
            run_id=run_id,
            fingerprint=fp,
            accountant=config.accountant,
            delta_sample=resolved["delta_sample"],
            delta_user=resolved["delta_user"],
            config={"dp": config.to_dict(), "shape": asdict(shape), "resolved": resolved},
        )
        return cls(PrivacyLedger.create(path, header), config, shape, resolved)

    # -- parameters --------------------------------------------------------------------------

    @property
    def delta_sample(self) -> float | None:
        v = self.resolved.get("delta_sample")
        return None if v is None else float(v)

    @property
    def delta_user(self) -> float | None:
        v = self.resolved.get("delta_user")
        return None if v is None else float(v)

    @property
    def sample_noise_multiplier(self) -> float | None:
        v = self.resolved.get("noise_sample")
        return None if v is None else float(v)

    @property
    def user_noise_multiplier(self) -> float | None:
        v = self.resolved.get("noise_user")
        return None if v is None else float(v)

    @property
    def client_sampling_rate(self) -> float:
        return self.shape.expected_clients / self.shape.num_clients

    def planned_sample_event(self, client: int, steps: int | None = None) -> DpEvent:
        """The DP-SGD event a client will release if it runs ``steps`` (default: local_steps) steps."""
        sigma = self.sample_noise_multiplier
        if sigma is None:
            raise LedgerError("sample-level DP is off; no DP-SGD event to plan")
        return dp_sgd_event(self.shape.sample_rate(client), sigma, self.shape.local_steps if steps is None else steps)

    def resume_clip(self) -> float | None:
        """The adaptive user-level clip to continue with (the last committed round's ``next_clip``)."""
        v = self.ledger.last_info().get("next_clip")
        return None if v is None else float(v)

    # -- the round protocol --------------------------------------------------------------------

    def plan_round(
        self,
        round_index: int,
        *,
        sample: Mapping[Any, DpEvent] | None = None,
        user: DpEvent | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> RoundTicket:
        """Check the planned releases against the budget, then record them (one transaction).

        Raises:
            BudgetExceededError: nothing was recorded; do not run this round.
        """
        planned_sample = {str(k): v for k, v in (sample or {}).items()}
        if planned_sample and not self.config.sample.enabled:
            raise LedgerError("sample-level releases planned but dp.sample is off")
        if user is not None and not self.config.user.enabled:
            raise LedgerError("a user-level release planned but dp.user is off")
        proj_s, proj_u = self.guard.check(
            sample_history=self.ledger.history("sample"),
            user_history=self.ledger.history("user").get("server", []),
            planned_sample=planned_sample,
            planned_user=user,
        )
        releases = [Release("sample", s, e) for s, e in planned_sample.items()]
        if user is not None:
            releases.append(Release("user", "server", user))
        seq = self.ledger.plan(round_index, releases, info)
        return RoundTicket(seq, round_index, planned_sample, user, proj_s, proj_u)

    def commit_round(
        self,
        ticket: RoundTicket,
        *,
        sample: Mapping[Any, DpEvent] | None = None,
        user: DpEvent | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> PrivacySpent:
        """Record what the round actually released (one transaction); call before publishing the model.

        The actual releases must not exceed the plan. If they do, they are
        still recorded (spent budget is never dropped) and a LedgerError is raised.
        """
        actual = {str(k): v for k, v in (sample or {}).items()}
        releases = [Release("sample", s, e) for s, e in actual.items()]
        if user is not None:
            releases.append(Release("user", "server", user))
        self.ledger.commit(ticket.seq, releases, info)
        bad = [s for s, e in actual.items() if s not in ticket.planned_sample or not _dominated(e, ticket.planned_sample[s])]
        if user is not None and (ticket.planned_user is None or not _dominated(user, ticket.planned_user)):
            bad.append("server")
        if bad:
            raise LedgerError(
                f"round {ticket.round} released more than it planned for {bad[:5]}; recorded as released, "
                "but the budget check did not cover it. Plan every release before running it."
            )
        return self.spent()

    def spent(self) -> PrivacySpent:
        acc = self.config.accountant
        sample = user = None
        if self.delta_sample is not None:
            sample = level_epsilon("sample", self.ledger.history("sample"), self.delta_sample, accountant=acc)
        if self.delta_user is not None:
            user = level_epsilon("user", self.ledger.history("user"), self.delta_user, accountant=acc)
        return PrivacySpent(acc, sample, user)

    def close(self) -> None:
        self.ledger.close()


def expected_epsilons(config: DPConfig, shape: RunShape) -> dict[str, float | None]:
    """What the planned run would spend if every client joined every round (worst case)."""
    res = PrivacySession.resolve(config, shape)
    out: dict[str, float | None] = {"sample": None, "user": None}
    if res["noise_sample"] is not None:
        q = max(shape.sample_rate(c) for c in range(shape.num_clients))
        ev = dp_sgd_event(q, res["noise_sample"], shape.rounds * shape.local_steps)
        out["sample"] = ACCOUNTANTS.create(config.accountant).compose(ev).epsilon(res["delta_sample"])
    if res["noise_user"] is not None:
        ev = dp_sgd_event(shape.expected_clients / shape.num_clients, res["noise_user"], shape.rounds)
        out["user"] = ACCOUNTANTS.create(config.accountant).compose(ev).epsilon(res["delta_user"])
    return {k: (v if v is None or math.isfinite(v) else math.inf) for k, v in out.items()}
