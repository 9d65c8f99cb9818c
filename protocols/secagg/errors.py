"""SecAgg-specific refinements of the typed errors in :mod:`securefed.protocols.errors`.

Each says who is at fault (h11's local/remote split) and what the protocol
does about it; ``docs/secure-aggregation.md`` has the full table.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError


class ShareReleaseRefusedError(RemoteProtocolError):
    """The server asked a client for shares it must not reveal.

    Raised for a request naming the same peer as survivor and as dropped (the
    semi-malicious server of Bell et al. 2020 that collects both shares of one
    client), a client's own key share, a peer whose bundle the client rejected,
    or a survivor list that differs from the one the client signed. The client
    reveals nothing; the round aborts.
    """


class TooFewPeersError(RemoteProtocolError):
    """A stage left a client with fewer than ``t`` live share holders around it.

    An honest server aborts before this happens (it runs the same check), so a
    client seeing it refuses to continue.
    """


class DuplicateKeyError(RemoteProtocolError):
    """A public key appears twice among the advertised keys (Bonawitz et al. 2017, Fig. 4)."""


class NonFiniteUpdateError(LocalProtocolError, ValueError):
    """A client's update contains NaN or Inf: it cannot be encoded, so the round refuses it."""
