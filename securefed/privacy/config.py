"""The ``[dp]`` configuration: which guarantee a run asks for, validated up front.

Two independent levels (docs/differential-privacy.md explains how they relate):

* ``dp.sample``: *sample-level* DP-SGD inside every client (Abadi et al., CCS
  2016). Neighbouring datasets differ in one training example of one client.
  The client adds the noise, so the guarantee holds against the server too.
* ``dp.user``: *user-level* DP-FedAvg on the server (McMahan et al., ICLR 2018).
  Neighbouring datasets differ in all the data of one client. The server adds
  the noise, so the guarantee holds against whoever sees the released model,
  not against the server itself.

``dp.budget`` caps each level's epsilon; ``dp.delta`` is shared. Defaults leave
DP off. Every field that controls noise, clipping or budget fails closed: a
value set for a level that is off is an error, not silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

from securefed.errors import ConfigError

GradSampleMode = Literal["hooks", "functorch", "ghost"]
AccountantName = Literal["pld", "rdp", "prv"]


class PrivacyWarning(UserWarning):
    """A setting is legal but weakens the guarantee (e.g. delta >= 1/n)."""


def _positive(value: float | None, key: str, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}", key=key)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value}", key=key)


def _noise_or_target(noise: float | None, target: float | None, prefix: str, enabled: bool) -> None:
    if not enabled:
        for name, v in (("noise_multiplier", noise), ("target_epsilon", target)):
            if v is not None:
                raise ConfigError(
                    f"is set but {prefix}.enabled is false; set {prefix}.enabled = true or remove it",
                    key=f"{prefix}.{name}",
                )
        return
    if noise is not None and noise == 0:
        raise ConfigError(
            "a noise multiplier of 0 gives no privacy; use a value > 0 or disable this level",
            key=f"{prefix}.noise_multiplier",
        )
    _positive(noise, f"{prefix}.noise_multiplier", "the noise multiplier")
    _positive(target, f"{prefix}.target_epsilon", "the target epsilon")
    if (noise is None) == (target is None):
        raise ConfigError(
            "set exactly one of noise_multiplier (fixed noise) or target_epsilon (noise calibrated "
            "to reach it over the planned rounds)",
            key=f"{prefix}.noise_multiplier",
        )


@dataclass(frozen=True)
class SampleDPConfig:
    """Sample-level DP-SGD in each client.

    Attributes:
        enabled: run DP-SGD in the clients.
        noise_multiplier: sigma; the noise on the clipped gradient sum has std sigma * clip.
        target_epsilon: alternative to ``noise_multiplier``: calibrate sigma so the
            worst-case client (sampled every round) ends at this epsilon.
        clip: per-example L2 clipping norm C.
        mode: Opacus grad-sample mode (each passes the per-sample oracle for LoRA).
        secure_mode: draw noise and Poisson batches from the AES-CTR CSPRNG.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip: float = 1.0
    mode: GradSampleMode = "hooks"
    secure_mode: bool = True

    def __post_init__(self) -> None:
        _noise_or_target(self.noise_multiplier, self.target_epsilon, "dp.sample", self.enabled)
        _positive(self.clip, "dp.sample.clip", "the per-example clipping norm")
        if self.mode not in ("hooks", "functorch", "ghost"):
            raise ConfigError(f"unknown grad-sample mode {self.mode!r}; use hooks, functorch or ghost", key="dp.sample.mode")


@dataclass(frozen=True)
class UserDPConfig:
    """User-level DP-FedAvg on the server.

    Attributes:
        enabled: clip each client's update and add server noise once per round.
        clip: L2 bound S on one client's update (the initial value when adaptive).
        noise_multiplier: z; the noise on the sum of clipped updates has std z * S.
        target_epsilon: alternative to ``noise_multiplier``, calibrated over the planned rounds.
        clipping: ``fixed`` S, or ``adaptive`` (Andrew et al., NeurIPS 2021): S tracks
            the ``target_quantile`` of update norms, learned from a noised count.
        target_quantile: gamma, the fraction of updates that should be unclipped.
        clip_learning_rate: eta_C of the geometric update S <- S * exp(-eta_C (b - gamma)).
        count_noise_multiplier: sigma_b, std of the noise on the count of unclipped
            clients; None means expected clients / 20 (the paper's recommendation).
        secure_mode: draw the server noise and client sampling from the CSPRNG.
    """

    enabled: bool = False
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clipping: Literal["fixed", "adaptive"] = "fixed"
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    secure_mode: bool = True

    def __post_init__(self) -> None:
        _noise_or_target(self.noise_multiplier, self.target_epsilon, "dp.user", self.enabled)
        _positive(self.clip, "dp.user.clip", "the update clipping norm")
        if self.clipping not in ("fixed", "adaptive"):
            raise ConfigError(f"unknown clipping {self.clipping!r}; use fixed or adaptive", key="dp.user.clipping")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"must be in (0, 1), got {self.target_quantile}", key="dp.user.target_quantile")
        _positive(self.clip_learning_rate, "dp.user.clip_learning_rate", "the clip learning rate")
        _positive(self.count_noise_multiplier, "dp.user.count_noise_multiplier", "the count noise")
        if self.clipping == "fixed" and self.count_noise_multiplier is not None:
            raise ConfigError("only used with clipping = \"adaptive\"; remove it", key="dp.user.count_noise_multiplier")


@dataclass(frozen=True)
class BudgetConfig:
    """Epsilon caps; a round that would pass one is refused before any noise is drawn."""

    sample_epsilon: float | None = None
    user_epsilon: float | None = None

    def __post_init__(self) -> None:
        _positive(self.sample_epsilon, "dp.budget.sample_epsilon", "the sample-level budget")
        _positive(self.user_epsilon, "dp.budget.user_epsilon", "the user-level budget")


@dataclass(frozen=True)
class DPConfig:
    """The whole ``[dp]`` table.

    Attributes:
        delta: the delta at which every epsilon is reported. ``None`` picks
            ``min(1e-5, 1/(10 n))`` per level (n = examples of the smallest client
            for the sample level, clients for the user level); see :meth:`resolve_delta`.
        accountant: ``pld`` (dp-accounting privacy loss distributions, tight),
            ``rdp`` (dp-accounting Renyi DP, looser, fast) or ``prv`` (Opacus PRV;
            Poisson-subsampled Gaussians only).
    """

    sample: SampleDPConfig = field(default_factory=SampleDPConfig)
    user: UserDPConfig = field(default_factory=UserDPConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    delta: float | None = None
    accountant: AccountantName = "pld"

    def __post_init__(self) -> None:
        if self.delta is not None:
            if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not math.isfinite(self.delta):
                raise ConfigError(f"must be a number in (0, 1), got {self.delta!r}", key="dp.delta")
            if not 0 < self.delta < 1:
                raise ConfigError(
                    f"must be in (0, 1) and in practice well below 1/n, got {self.delta}", key="dp.delta"
                )
        if self.accountant not in ("pld", "rdp", "prv"):
            raise ConfigError(f"unknown accountant {self.accountant!r}; use pld, rdp or prv", key="dp.accountant")
        for level, cfg, cap in (
            ("sample", self.sample, self.budget.sample_epsilon),
            ("user", self.user, self.budget.user_epsilon),
        ):
            if cap is not None and not cfg.enabled:
                raise ConfigError(
                    f"a {level}-level budget is set but dp.{level}.enabled is false", key=f"dp.budget.{level}_epsilon"
                )
            if cap is not None and cfg.target_epsilon is not None and cfg.target_epsilon > cap:
                raise ConfigError(
                    f"target epsilon {cfg.target_epsilon} exceeds the budget {cap}; lower the target or raise the budget",
                    key=f"dp.{level}.target_epsilon",
                )

    @property
    def enabled(self) -> bool:
        return self.sample.enabled or self.user.enabled

    def resolve_delta(self, n: int, *, level: str) -> float:
        """The delta for a level whose neighbouring unit has ``n`` members.

        ``n`` is the number of examples of the smallest client (sample level) or
        the number of clients (user level). A delta of 1/n or more admits
        mechanisms that publish one member's data outright, so it warns.
        """
        if n < 1:
            raise ConfigError(f"cannot resolve delta for {n} {level}-level units", key="dp.delta")
        delta = self.delta if self.delta is not None else min(1e-5, 1.0 / (10.0 * n))
        if delta >= 1.0 / n:
            warnings.warn(
                f"dp.delta = {delta:g} is >= 1/n = {1.0 / n:g} at the {level} level (n = {n}); such a delta "
                "allows releasing one member's data in the clear. Use a smaller dp.delta.",
                PrivacyWarning,
                stacklevel=2,
            )
        return delta

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of this config; the ledger refuses a different one."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> DPConfig:
        """Rebuild from :meth:`to_dict` output (used by the report and the ledger)."""
        sample = data.get("sample", {})
        user = data.get("user", {})
        budget = data.get("budget", {})
        if not isinstance(sample, dict) or not isinstance(user, dict) or not isinstance(budget, dict):
            raise ConfigError("dp.sample, dp.user and dp.budget must be tables", key="dp")
        rest = {k: v for k, v in data.items() if k not in ("sample", "user", "budget")}
        return cls(
            sample=SampleDPConfig(**sample),
            user=UserDPConfig(**user),
            budget=BudgetConfig(**budget),
            **rest,  # type: ignore[arg-type]
        )
