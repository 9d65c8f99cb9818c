"""SecAgg / SecAgg+ pairwise-masking secure aggregation (Bonawitz et al. 2017; Bell et al. 2020).

Importing this package registers ``"secagg"`` (complete graph) and
``"secagg+"`` (sparse Harary graph chosen by a parameter finder) in
:data:`securefed.protocols.AGGREGATORS`. Modules:

* :mod:`.params`: neighbour graphs and the degree/threshold finder;
* :mod:`.messages`: frozen message dataclasses and the strict wire format;
* :mod:`.keys`: key contexts, commitments and signed bytes, defined once;
* :mod:`.masking`: mask expansion, the hot path;
* :mod:`.client`, :mod:`.server`: the sans-I/O state machines;
* :mod:`.aggregator`: option validation, rounds and registration.

See ``docs/secure-aggregation.md`` for threat models and parameter choice.
"""

from __future__ import annotations

from .aggregator import SecAggAggregator, SecAggPlusAggregator, SecAggRound, build_config
from .client import ClientStage, SecAggClient, client_transitions
from .config import SecAggConfig
from .errors import (
    DuplicateKeyError,
    NonFiniteUpdateError,
    ShareReleaseRefusedError,
    TooFewPeersError,
)
from .messages import STAGES
from .params import GraphParameters, NeighbourGraph, ThreatModel, find_parameters
from .server import SecAggServer, ServerStage, server_transitions

__all__ = [
    "STAGES",
    "ClientStage",
    "DuplicateKeyError",
    "GraphParameters",
    "NeighbourGraph",
    "NonFiniteUpdateError",
    "SecAggAggregator",
    "SecAggClient",
    "SecAggConfig",
    "SecAggPlusAggregator",
    "SecAggRound",
    "SecAggServer",
    "ServerStage",
    "ShareReleaseRefusedError",
    "ThreatModel",
    "TooFewPeersError",
    "build_config",
    "client_transitions",
    "find_parameters",
    "server_transitions",
]
