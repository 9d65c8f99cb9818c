"""Typed errors of the attack layer.

Every error says what to change. Attacks never return a silent wrong number:
when a view cannot be inverted (ciphertexts, too many tokens for the method)
they return an explicit result with a status and a note instead of raising;
they raise only for misuse (wrong input type, a view that contradicts the
model, bad options, corrupt files).
"""

from __future__ import annotations

from securefed.errors import ConfigError, SecurefedError


class AttackError(SecurefedError):
    """Base class of the attack layer's errors."""


class NotAServerViewError(AttackError, TypeError):
    """An attack was given something other than a :class:`~securefed.attacks.views.ServerView`.

    Attacks see only what an honest-but-curious server holds; a client's
    private state (its data, its model, its optimizer) is never a valid input.
    """


class ViewMismatchError(AttackError, ValueError):
    """The view's adapter spec or update does not fit the public model it names."""


class UnsupportedModelError(AttackError):
    """The attack does not know how to read this model architecture."""


class ViewFormatError(AttackError, ValueError):
    """Recorded views on disk are missing, corrupt or of an unknown version."""


class AttackConfigError(AttackError, ConfigError):
    """An attack option is unknown or out of range (``key`` names it)."""
