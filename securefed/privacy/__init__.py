"""Differential privacy for securefed: DP-SGD in clients, DP-FedAvg on the server, accounting.

* :mod:`.config`: the validated ``[dp]`` table (``DPConfig``).
* :mod:`.events`, :mod:`.accountants`, :mod:`.calibrate`: immutable DP events,
  ``dp-accounting`` / Opacus accountants, noise calibration.
* :mod:`.secure_noise`: CSPRNG Gaussian noise and sampling (secure mode).
* :mod:`.dp_sgd`, :mod:`.oracle`: Opacus DP-SGD on PEFT adapters and its per-sample oracle.
* :mod:`.user_level`: DP-FedAvg with fixed or adaptive clipping.
* :mod:`.ledger`, :mod:`.budget`, :mod:`.session`: the crash-safe ledger, the budget
  guard and the per-run session the federated loop drives.
* :mod:`.report`: the privacy report of a run directory.

See docs/differential-privacy.md.
"""

from .accountants import ACCOUNTANTS, Accountant, NeighbouringRelation, epsilon_of
from .budget import BudgetGuard, LevelEpsilon
from .calibrate import calibrate_noise_multiplier, rounds_within_budget
from .config import BudgetConfig, DPConfig, PrivacyWarning, SampleDPConfig, UserDPConfig
from .errors import (
    BudgetExceededError,
    CalibrationError,
    LedgerCorruptError,
    LedgerError,
    LedgerMismatchError,
    OracleMismatchError,
    UnsupportedEventError,
    UnsupportedMethodError,
)
from .events import (
    ComposedEvent,
    DiscreteGaussianEvent,
    DpEvent,
    GaussianEvent,
    NonPrivateEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    SkellamEvent,
    dp_sgd_event,
    event_from_json,
    event_to_json,
)
from .ledger import LEDGER_FILE, PrivacyLedger, Release
from .secure_noise import FastNoise, NoiseSource, SecureNoise, noise_source
from .session import PrivacySession, PrivacySpent, RoundTicket, RunShape

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILE",
    "Accountant",
    "BudgetConfig",
    "BudgetExceededError",
    "BudgetGuard",
    "CalibrationError",
    "ComposedEvent",
    "DPConfig",
    "DiscreteGaussianEvent",
    "DpEvent",
    "FastNoise",
    "GaussianEvent",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerMismatchError",
    "LevelEpsilon",
    "NeighbouringRelation",
    "NoOpEvent",
    "NoiseSource",
    "NonPrivateEvent",
    "OracleMismatchError",
    "PoissonSampledEvent",
    "PrivacyLedger",
    "PrivacySession",
    "PrivacySpent",
    "PrivacyWarning",
    "Release",
    "RoundTicket",
    "RunShape",
    "SampleDPConfig",
    "SecureNoise",
    "SelfComposedEvent",
    "SkellamEvent",
    "UnsupportedEventError",
    "UnsupportedMethodError",
    "UserDPConfig",
    "calibrate_noise_multiplier",
    "dp_sgd_event",
    "epsilon_of",
    "event_from_json",
    "event_to_json",
    "noise_source",
    "rounds_within_budget",
]
