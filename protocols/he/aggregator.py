"""The ``ckks`` and ``bfv`` aggregators: options, rounds, results.

Select one in a run config::

    [aggregation]
    name = "ckks"            # or "bfv"
    [aggregation.options]
    key_mode = "client-held" # or "key-authority"
    min_clients = 2
    max_clients = 100        # parameters are proven for sums of up to this many
    precision = 1e-5         # required bound on max |decrypted sum - true sum|
    clip = 1.0               # per-entry clipping before weighting
    max_weight = 1.0         # largest client weight (raise it for example-count weights)

Where the new global model comes from: the party that decrypts returns the
aggregate to the model-update step. Under ``key-authority`` that is the
authority, which releases the sum to the server (the server then learns the
sum, as with masking, never an individual update). Under ``client-held`` it
is a decrypting client: :meth:`AggregationRound.result` reads the sum from
it, and the server's :class:`ServerObservation` has ``aggregate=None`` (in a
deployment every client decrypts the aggregate ciphertext and applies the
same FedAvg step; the server keeps only ciphertexts).

The round metrics report the parameters, the a-priori ``precision_bound`` for
the actual number of contributors, and, in this simulation only (the round
object holds every input, no party does), ``max_abs_error`` of the decrypted
sum against the plaintext sum of ``w * clip(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from ..base import (
    AGGREGATORS,
    AUTHORITY,
    AggregateResult,
    AggregationRound,
    Aggregator,
    ClientInput,
    Party,
)
from ..errors import ConfigurationError, LocalProtocolError, RoundAbortedError
from .authority import HEAuthority
from .client import HEClient
from .keys import KEY_MODES
from .parallel import DEFAULT_THRESHOLD, default_workers
from .params import MAX_COEFF_BITS, HEParams, select_params
from .server import STAGES, HEServer
from .state import HESettings, RunState

DEFAULTS: dict[str, object] = {
    "key_mode": "client-held",
    "min_clients": 2,
    "max_clients": 100,
    "precision": 1e-5,
    "clip": 1.0,
    "max_weight": 1.0,
    "poly_modulus_degree": 8192,
    "rotate_every": 0,
    "decryptors": 1,
    "workers": 0,
    "parallel_threshold": DEFAULT_THRESHOLD,
    "measure_error": True,
    "pairwise_masks": False,
}


def _int(options: Mapping[str, object], key: str, lo: int) -> int:
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigurationError(f"aggregation option {key!r} must be an integer, got {v!r}")
    if v < lo:
        raise ConfigurationError(f"aggregation option {key!r} must be >= {lo}, got {v}")
    return v


def _float(options: Mapping[str, object], key: str) -> float:
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ConfigurationError(f"aggregation option {key!r} must be a positive finite number, got {v!r}")
    return float(v)


def build_settings(scheme: str, options: Mapping[str, object]) -> HESettings:
    """Validate ``options`` (unknown or out-of-range keys raise ConfigurationError naming the key)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigurationError(
            f"unknown {scheme} aggregation option(s) {unknown}; known: {sorted(DEFAULTS)}"
        )
    opts = {**DEFAULTS, **options}
    mode = opts["key_mode"]
    if mode not in KEY_MODES:
        raise ConfigurationError(f"aggregation option 'key_mode' must be one of {KEY_MODES}, got {mode!r}")
    min_clients = _int(opts, "min_clients", 1)
    max_clients = _int(opts, "max_clients", 1)
    if max_clients < min_clients:
        raise ConfigurationError(f"aggregation option 'max_clients' ({max_clients}) is below min_clients ({min_clients})")
    n = _int(opts, "poly_modulus_degree", 1)
    if n not in MAX_COEFF_BITS:
        raise ConfigurationError(
            f"aggregation option 'poly_modulus_degree' must be one of {sorted(MAX_COEFF_BITS)}, got {n}"
        )
    if not isinstance(opts["measure_error"], bool):
        raise ConfigurationError(f"aggregation option 'measure_error' must be true or false, got {opts['measure_error']!r}")
    if not isinstance(opts["pairwise_masks"], bool):
        raise ConfigurationError(f"aggregation option 'pairwise_masks' must be true or false, got {opts['pairwise_masks']!r}")
    if opts["pairwise_masks"] and scheme != "bfv":
        raise ConfigurationError(
            "aggregation option 'pairwise_masks' needs exact modular sums: use name = \"bfv\" (CKKS cannot cancel masks)"
        )
    workers = _int(opts, "workers", 0)
    params = select_params(
        scheme, max_clients=max_clients, clip=_float(opts, "clip"), max_weight=_float(opts, "max_weight"),
        precision=_float(opts, "precision"), symmetric=mode == "client-held", poly_modulus_degree=n,
    )
    return HESettings(
        params=params,
        key_mode=str(mode),
        min_clients=min_clients,
        rotate_every=_int(opts, "rotate_every", 0),
        decryptors=_int(opts, "decryptors", 1),
        workers=workers or default_workers(),
        parallel_threshold=_int(opts, "parallel_threshold", 1),
        measure_error=bool(opts["measure_error"]),
        pairwise_masks=bool(opts["pairwise_masks"]),
    )


class HERound(AggregationRound):
    """The parties of one HE round; the result comes from whoever decrypted."""

    def __init__(
        self, round_index: int, inputs: Mapping[int, ClientInput], settings: HESettings, state: RunState
    ) -> None:
        if not inputs:
            raise LocalProtocolError("a round needs at least one client input")
        dims = {v.vector.shape[0] for v in inputs.values()}
        if len(dims) != 1:
            raise LocalProtocolError(f"client inputs have different lengths: {sorted(dims)}")
        ids = tuple(sorted(inputs))
        if any(c < 0 for c in ids):
            raise LocalProtocolError("client ids must be non-negative")
        if len(ids) > settings.params.max_clients:
            raise ConfigurationError(
                f"{len(ids)} clients in round {round_index} exceed max_clients={settings.params.max_clients}, "
                "the largest sum the HE parameters are proven for; raise max_clients"
            )
        dim = dims.pop()
        self._settings = settings
        self._inputs = inputs
        self._dim = dim
        self.server: HEServer = HEServer(round_index, ids, dim, settings, state.server)
        self.he_clients = {c: HEClient(c, round_index, inputs[c], settings, state.client(c)) for c in ids}
        self.clients: Mapping[int, Party] = dict(self.he_clients)
        self.authority: HEAuthority | None = None
        self.others: Mapping[int, Party] = {}
        if settings.key_mode == "key-authority":
            self.authority = HEAuthority(round_index, dim, settings, state.authority)
            self.others = {AUTHORITY: self.authority}

    def _decrypted(self) -> AggregateResult:
        if self.authority is not None:
            res = self.authority.result()
        else:
            res = next((r for c in sorted(self.he_clients) if (r := self.he_clients[c].result()) is not None), None)
        if res is None:
            raise RoundAbortedError(f"no party decrypted an aggregate (server stage {self.server.stage!r})")
        return res

    def result(self) -> AggregateResult:
        res = self._decrypted()
        params = self._settings.params
        n = len(res.contributors)
        meas: dict[str, float | int | str] = {
            "scheme": params.scheme,
            "key_mode": self._settings.key_mode,
            "poly_modulus_degree": params.poly_modulus_degree,
            "scale_bits": params.scale_bits,
            "precision_bound": params.error_bound(n),
            "ciphertexts_per_upload": params.n_chunks(self._dim + 1),
            "upload_bytes_per_param": float(
                np.mean([self.he_clients[c].upload_bytes for c in res.contributors]) / max(self._dim, 1)
            ),
            "clipped_entries": int(sum(self.he_clients[c].clipped for c in res.contributors)),
            "key_generated": int(self.server.key_generated),
            "pairwise_masks": int(self._settings.pairwise_masks),
        }
        if params.scheme == "bfv":
            meas["plain_modulus_bits"] = params.plain_modulus.bit_length()
        if self._settings.measure_error:
            meas["max_abs_error"] = self._oracle_error(res, params)
        return AggregateResult(res.total, res.total_weight, res.contributors, meas)

    def _oracle_error(self, res: AggregateResult, params: HEParams) -> float:
        """Simulation only: max |decrypted - sum of w * clip(x)| over the update and the weight."""
        want = np.zeros(self._dim, dtype=np.float64)
        weight = 0.0
        for c in res.contributors:
            inp = self._inputs[c]
            want += inp.weight * np.clip(inp.vector.astype(np.float64), -params.clip, params.clip)
            weight += inp.weight
        err = float(np.max(np.abs(res.total - want))) if self._dim else 0.0
        return max(err, abs(res.total_weight - weight))


class HEAggregator(Aggregator):
    """Homomorphic aggregation under ``scheme``; one instance per run (it keeps the keys' state)."""

    scheme: ClassVar[str]
    stages = STAGES

    def __init__(self, **options: object) -> None:
        self.settings = build_settings(self.scheme, options)
        self._state = RunState()

    @property
    def params(self) -> HEParams:
        return self.settings.params

    def new_round(self, round_index: int, inputs: Mapping[int, ClientInput]) -> HERound:
        return HERound(round_index, inputs, self.settings, self._state)


class CKKSAggregator(HEAggregator):
    """Approximate sums under CKKS (one 60-bit data prime; error bound in the metrics)."""

    name = "ckks"
    scheme = "ckks"


class BFVAggregator(HEAggregator):
    """Exact sums of fixed-point updates under BFV (16 bytes per parameter)."""

    name = "bfv"
    scheme = "bfv"


AGGREGATORS.register(CKKSAggregator.name, CKKSAggregator)
AGGREGATORS.register(BFVAggregator.name, BFVAggregator)
