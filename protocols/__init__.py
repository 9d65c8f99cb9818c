"""Secure aggregation protocols, importable as ``securefed.protocols``.

Every aggregator is a sans-I/O state machine behind
:class:`~securefed.protocols.base.Aggregator` (see :mod:`.base`). Importing this
package registers the built-in aggregators in :data:`AGGREGATORS`.
"""

from __future__ import annotations

from . import he as _he  # noqa: F401  (registers "ckks", "bfv")
from . import plaintext as _plaintext  # noqa: F401  (registers "plaintext")
from . import secagg as _secagg  # noqa: F401  (registers "secagg", "secagg+")
from .base import (
    AGGREGATORS,
    AUTHORITY,
    SERVER,
    AggregateResult,
    AggregationRound,
    Aggregator,
    AggregatorRegistry,
    ClientInput,
    Message,
    Party,
    ServerObservation,
    ServerParty,
)
from .encoding import FixedPointEncoder

__all__ = [
    "AGGREGATORS",
    "AUTHORITY",
    "SERVER",
    "AggregateResult",
    "AggregationRound",
    "Aggregator",
    "AggregatorRegistry",
    "ClientInput",
    "FixedPointEncoder",
    "Message",
    "Party",
    "ServerObservation",
    "ServerParty",
]
