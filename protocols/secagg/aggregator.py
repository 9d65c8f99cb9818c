"""The ``secagg`` and ``secagg+`` aggregators: validated options, rounds, registration.

Selected in a run config as::

    [aggregation]
    name = "secagg+"          # or "secagg"
    [aggregation.options]
    clip = 1.0                # per-entry clipping bound c
    scale_bits = 16           # fixed-point resolution 2^-f
    modulus_bits = 32         # ring Z_{2^b}
    max_weight = 1.0          # largest client weight (1.0 = unweighted sum)
    dropout_rate = 0.1        # expected fraction of clients dropping in a round
    corrupt_fraction = 0.05   # fraction of clients that may collude with the server
    authenticated = false     # signed keys + consistency round (semi-malicious server)
    # k = 10, threshold = 6   # override the parameter finder (secagg+ only for k)

Unknown options and out-of-range values raise
:class:`~securefed.protocols.errors.ConfigurationError` naming the key.

**Weighted averaging under masking.** A client's upload is the ring vector
``encode(w * clip(x)) || encode(w * c) || clipped_count``, all masked. The
server therefore learns ``sum_i w_i clip(x_i)`` (``AggregateResult.total``),
``sum_i w_i`` (``total_weight``; encoding ``w * c`` through the same encoder
keeps it under the same capacity proof, and it is exact whenever
``w * c * 2^f`` is an integer) and the total number of clipped entries, never
any single client's weight or clip count. Dividing is left to the caller
(FedAvg), which is also where DP noise calibrated to the clip goes.

**Stages** are ``advertise_keys, share_keys, masked_input, consistency_check,
unmasking``. The unauthenticated variant skips ``consistency_check``; a
simulated dropout named at that stage takes effect at ``unmasking``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..base import AGGREGATORS, AggregateResult, AggregationRound, Aggregator, ClientInput
from ..encoding import FixedPointEncoder
from ..errors import ConfigurationError, TooFewClientsError
from ..primitives import sign
from .client import SecAggClient
from .config import SecAggConfig
from .errors import NonFiniteUpdateError
from .messages import MAX_CLIENT_ID, STAGES
from .params import CORRECTNESS_BITS, SECURITY_BITS, ThreatModel
from .server import SecAggServer


def _take(options: dict[str, object], key: str, kind: type, default: object) -> object:
    if key not in options:
        return default
    v = options.pop(key)
    if v is None and default is None:
        return None
    if kind is float:
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        v = float(v) if ok else v  # type: ignore[arg-type]
    elif kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, kind)
    if not ok:
        raise ConfigurationError(f"aggregation option {key!r} must be {kind.__name__}, got {v!r}")
    return v


def build_config(protocol: str, options: Mapping[str, object]) -> SecAggConfig:
    """Validate ``options`` for ``protocol`` into a :class:`SecAggConfig`."""
    opts = dict(options)
    clip = _take(opts, "clip", float, 1.0)
    scale_bits = _take(opts, "scale_bits", int, 16)
    modulus_bits = _take(opts, "modulus_bits", int, 32)
    max_weight = _take(opts, "max_weight", float, 1.0)
    threshold = _take(opts, "threshold", int, None)
    dropout_rate = _take(opts, "dropout_rate", float, 0.1)
    corrupt_fraction = _take(opts, "corrupt_fraction", float, 0.05)
    authenticated = _take(opts, "authenticated", bool, False)
    threads = _take(opts, "threads", int, 1)
    max_clients = _take(opts, "max_clients", int, None)
    security_bits = _take(opts, "security_bits", int, SECURITY_BITS)
    correctness_bits = _take(opts, "correctness_bits", int, CORRECTNESS_BITS)
    default_graph = "harary" if protocol == "secagg+" else "complete"
    graph = _take(opts, "graph", str, default_graph)
    k = _take(opts, "k", int, None)
    if opts:
        raise ConfigurationError(
            f"unknown {protocol} option(s) {sorted(opts)}; known: clip, scale_bits, modulus_bits, max_weight, "
            "threshold, dropout_rate, corrupt_fraction, authenticated, threads, max_clients, security_bits, "
            "correctness_bits, graph, k"
        )
    if graph not in ("complete", "harary"):
        raise ConfigurationError(f"graph must be 'complete' or 'harary', got {graph!r}")
    if protocol == "secagg" and graph != "complete":
        raise ConfigurationError("secagg uses the complete graph; use aggregation 'secagg+' for graph='harary'")
    if graph == "complete" and k is not None:
        raise ConfigurationError("k applies to graph='harary' only (secagg+); remove k")
    if modulus_bits is not None and not 2 <= modulus_bits <= 64:  # type: ignore[operator]
        raise ConfigurationError(f"modulus_bits must be in 2..64, got {modulus_bits}")
    if max_clients is not None and max_clients < 2:  # type: ignore[operator]
        raise ConfigurationError(f"max_clients must be at least 2, got {max_clients}")
    encoder = FixedPointEncoder(
        clip=clip, scale_bits=scale_bits, modulus_bits=modulus_bits, max_weight=max_weight  # type: ignore[arg-type]
    )
    model = ThreatModel(
        dropout_rate=dropout_rate,  # type: ignore[arg-type]
        corrupt_fraction=corrupt_fraction,  # type: ignore[arg-type]
        semi_malicious=bool(authenticated),
        security_bits=security_bits,  # type: ignore[arg-type]
        correctness_bits=correctness_bits,  # type: ignore[arg-type]
    )
    cfg = SecAggConfig(
        protocol=protocol,
        encoder=encoder,
        sparse=graph == "harary",
        k=k,  # type: ignore[arg-type]
        threshold=threshold,  # type: ignore[arg-type]
        model=model,
        authenticated=bool(authenticated),
        threads=threads,  # type: ignore[arg-type]
        max_clients=max_clients,  # type: ignore[arg-type]
    )
    if max_clients is not None:
        encoder.check_capacity(max_clients)  # type: ignore[arg-type]
        cfg.parameters(max_clients)  # type: ignore[arg-type]
    return cfg


class SecAggRound(AggregationRound):
    """The parties of one SecAgg round; the result is read from the server."""

    server: SecAggServer
    clients: Mapping[int, SecAggClient]

    def __init__(self, server: SecAggServer, clients: Mapping[int, SecAggClient]) -> None:
        self.server = server
        self.clients = clients
        self.others = {}

    def result(self) -> AggregateResult:
        return self.server.result()


class SecAggAggregator(Aggregator):
    """Pairwise-masking secure aggregation over the complete graph (Bonawitz et al. 2017)."""

    name: ClassVar[str] = "secagg"
    stages: ClassVar[tuple[str, ...]] = STAGES

    def __init__(self, **options: object) -> None:
        self.config = build_config(self.name, options)
        # Long-term identity keys of the authenticated variant: the trusted PKI
        # registers each client's verification key once per run.
        self._identities: dict[int, Ed25519PrivateKey] = {}
        self._directory: dict[int, bytes] = {}

    def _identity(self, client: int) -> Ed25519PrivateKey:
        if client not in self._identities:
            sk, pk = sign.generate_signing_key()
            self._identities[client] = sk
            self._directory[client] = pk
        return self._identities[client]

    def new_round(self, round_index: int, inputs: Mapping[int, ClientInput]) -> SecAggRound:
        """Create the server and clients of one round.

        Raises:
            TooFewClientsError: fewer than 2 clients (a RoundAbortedError and a ConfigurationError).
            ConfigurationError: unequal lengths, a weight above
                ``max_weight``, a parameter the finder cannot satisfy.
            OverflowRiskError: ``n`` encoded updates could wrap the ring (names the knobs).
            NonFiniteUpdateError: an update contains NaN or Inf.
        """
        cfg = self.config
        ids = tuple(sorted(inputs))
        if len(ids) < 2:
            raise TooFewClientsError(
                f"{self.name} needs at least 2 clients per round (got {len(ids)}): the sum of one update is the update"
            )
        if not 0 <= round_index < 1 << 63:
            raise ConfigurationError(f"round index {round_index} out of range")
        dims = {inputs[c].vector.shape[0] for c in ids}
        if len(dims) != 1:
            raise ConfigurationError(f"client updates have different lengths: {sorted(dims)}")
        dim = dims.pop()
        if dim < 1:
            raise ConfigurationError("client updates are empty")
        for c in ids:
            if not 0 <= c <= MAX_CLIENT_ID:
                raise ConfigurationError(f"client id {c} must be in 0..{MAX_CLIENT_ID}")
            data = inputs[c]
            if not data.weight <= cfg.encoder.max_weight:
                raise ConfigurationError(
                    f"client {c} has weight {data.weight} > max_weight={cfg.encoder.max_weight}: raise max_weight "
                    "(the capacity check then re-verifies that the sum cannot wrap)"
                )
            if not (math.isfinite(float(data.vector.min())) and math.isfinite(float(data.vector.max()))):
                raise NonFiniteUpdateError(f"client {c}'s update contains NaN or Inf; refusing to aggregate it")
        cfg.encoder.check_capacity(len(ids))
        cfg.parameters(len(ids))
        directory = None
        identities: dict[int, Ed25519PrivateKey | None] = dict.fromkeys(ids)
        if cfg.authenticated:
            identities = {c: self._identity(c) for c in ids}
            directory = {c: self._directory[c] for c in ids}
        server = SecAggServer(round_index, ids, dim, cfg, directory=directory)
        clients = {
            c: SecAggClient(c, round_index, inputs[c], cfg, identity=identities[c], directory=directory) for c in ids
        }
        return SecAggRound(server, clients)


class SecAggPlusAggregator(SecAggAggregator):
    """SecAgg+ (Bell et al. 2020): masks and shares only along a sparse random Harary graph."""

    name: ClassVar[str] = "secagg+"


AGGREGATORS.register(SecAggAggregator.name, SecAggAggregator)
AGGREGATORS.register(SecAggPlusAggregator.name, SecAggPlusAggregator)
