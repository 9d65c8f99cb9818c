"""Typed errors of the securefed toolkit (loop, config, assets, privacy).

Protocol errors live in :mod:`securefed.protocols.errors`; attack errors in
:mod:`securefed.attacks`. Every message says what to change.
"""

from __future__ import annotations


class SecurefedError(Exception):
    """Base class of securefed's own errors."""


class ConfigError(SecurefedError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range.

    Attributes:
        key: the dotted config key at fault (e.g. ``"train.lr"``), when known.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class AssetError(SecurefedError):
    """A model or data set is missing or unreadable; the message says what to install."""


class DataError(SecurefedError, ValueError):
    """A data set or client partition cannot be used (e.g. a client with no examples)."""


class UpdateError(SecurefedError, ValueError):
    """A client update is malformed: NaN/Inf entries or the wrong length."""


class RunError(SecurefedError):
    """A run cannot start or continue (e.g. its output directory is inconsistent)."""


class PrivacyError(SecurefedError):
    """Base class of differential-privacy errors (budget, ledger, unsupported method)."""
