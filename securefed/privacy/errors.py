"""Typed errors of the privacy layer. Every message says what to change.

All derive from :class:`securefed.errors.PrivacyError`, so the loop can catch
the whole family; configuration mistakes raise
:class:`securefed.errors.ConfigError` with the dotted key at fault instead.
"""

from __future__ import annotations

from securefed.errors import PrivacyError


class BudgetExceededError(PrivacyError):
    """A planned release would take a privacy level past its configured budget.

    Raised by the budget guard *before* any noise is drawn or any update leaves
    a client, so nothing of the refused round is released.

    Attributes:
        level: ``"sample"`` or ``"user"``.
        projected: the epsilon the level would reach with the planned release.
        budget: the configured epsilon budget of that level.
    """

    def __init__(self, message: str, *, level: str, projected: float, budget: float) -> None:
        super().__init__(message)
        self.level = level
        self.projected = projected
        self.budget = budget


class CalibrationError(PrivacyError):
    """No noise multiplier in the searched range reaches the target epsilon."""


class UnsupportedEventError(PrivacyError):
    """An accountant cannot compose this kind of DP event (e.g. Skellam today)."""


class UnsupportedMethodError(PrivacyError):
    """A PEFT method / grad-sample mode pair that fails the per-sample oracle under DP."""


class OracleMismatchError(PrivacyError):
    """Opacus's clipped per-sample gradient sum disagrees with the by-hand oracle."""


class EventDecodeError(PrivacyError):
    """A stored DP event is malformed (unknown kind, bad field, too deep or too large)."""


class LedgerError(PrivacyError):
    """Base class of privacy-ledger errors."""


class LedgerCorruptError(LedgerError):
    """The ledger file is truncated, fails SQLite's integrity check or its hash chain.

    A run never resumes from such a ledger: starting from zero would forget
    spent privacy budget.
    """


class LedgerMismatchError(LedgerError):
    """The ledger belongs to another run, or the run's DP configuration changed."""
