"""Typed errors of the aggregation protocols.

Following h11, errors are split by *who* is at fault:

* :class:`LocalProtocolError`: the caller misused the API (wrong stage, bad
  configuration). Nothing was sent; fix the calling code or configuration.
* :class:`RemoteProtocolError`: a peer sent something invalid (malformed bytes,
  a message out of stage, a tampered ciphertext, a replay). The protocol
  excludes that peer or aborts the round, as each protocol documents.

Verification never returns a boolean: it raises one of these.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by :mod:`securefed.protocols`."""


class LocalProtocolError(ProtocolError):
    """The local caller violated the protocol or gave an invalid configuration."""


class ConfigurationError(LocalProtocolError, ValueError):
    """A protocol parameter is invalid; the message names the knob to change."""


class OverflowRiskError(ConfigurationError):
    """The fixed-point encoding could wrap around the modulus for this many clients."""


class RemoteProtocolError(ProtocolError):
    """A peer sent a message that violates the protocol."""

    def __init__(self, message: str, *, sender: int | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class DecodeError(RemoteProtocolError):
    """Bytes from a peer could not be decoded (truncated, oversized, wrong version)."""


class UnexpectedMessageError(RemoteProtocolError):
    """A message arrived in the wrong stage, twice, or from an unknown party."""


class IntegrityError(RemoteProtocolError):
    """Authenticated decryption or a signature check failed."""


class RoundAbortedError(ProtocolError):
    """The round cannot complete (e.g. survivors fell below the threshold).

    The server learns nothing beyond what it held when the round aborted.
    """


class TooFewClientsError(RoundAbortedError, ConfigurationError):
    """Too few clients entered a round for the protocol to hide any one of them (e.g. one client in SecAgg).

    A round-level condition (Poisson sampling or dropouts can cause it), so the
    loop treats it as an aborted round; it is also a ``ConfigurationError`` for
    callers that build rounds by hand.
    """
