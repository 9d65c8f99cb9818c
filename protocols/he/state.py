"""Settings of one HE run and what each party keeps between rounds.

Key set-up is per run (or per rotation), not per round, so parties need
memory across rounds: the server remembers the current key id (and, under a
key authority, the public context and who already received it); each client
and the authority keep their :class:`~.keys.KeyStore`. In a deployment that
is each party's disk; in this in-process simulation the
:class:`~.aggregator.HEAggregator` owns one :class:`RunState` and hands each
round's parties their own slice of it (a party never reads another's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tenseal as ts

from .keys import KeyStore
from .messages import Limits
from .params import HEParams


@dataclass(frozen=True)
class HESettings:
    """Validated options of an HE aggregator (see :func:`.aggregator.make_aggregator`).

    Attributes:
        params: the scheme parameters.
        key_mode: ``"client-held"`` or ``"key-authority"``.
        min_clients: smallest aggregate any decryptor agrees to decrypt.
        rotate_every: generate a new key every this many rounds (0: once per run).
        decryptors: client-held mode: how many contributors receive the aggregate to decrypt.
        workers: processes a client encrypts with (1: no parallelism).
        parallel_threshold: slots from which a client encrypts in parallel.
        measure_error: add the simulation-only error against the plaintext sum to the metrics.
        pairwise_masks: BFV only: mask each update pairwise under the encryption (:mod:`.hybrid`).
    """

    params: HEParams
    key_mode: str
    min_clients: int
    rotate_every: int
    decryptors: int
    workers: int
    parallel_threshold: int
    measure_error: bool
    pairwise_masks: bool = False

    @property
    def name(self) -> str:
        return self.params.scheme

    def limits(self, dim: int) -> Limits:
        """Decoding limits for an update of ``dim`` entries (plus the weight slot)."""
        return Limits(
            fingerprint=self.params.fingerprint,
            dim=dim,
            max_clients=self.params.max_clients,
            n_chunks=self.params.n_chunks(dim + 1),
            max_chunk_bytes=self.params.max_chunk_bytes,
        )

    def rotation_due(self, round_index: int, key_round: int | None) -> bool:
        if key_round is None:
            return True
        return self.rotate_every > 0 and round_index - key_round >= self.rotate_every


@dataclass
class ServerState:
    """The server's memory: the current key id, never a secret key."""

    key_id: bytes | None = None
    key_round: int | None = None
    #: The context the server adds under (parameters only, or parameters + public key).
    context: ts.Context | None = None
    #: Key-authority mode: the public context relayed to clients, and who already has it.
    public_context: bytes = b""
    delivered: set[int] = field(default_factory=set)


@dataclass
class RunState:
    """Every party's memory across the rounds of one run (simulation of their disks)."""

    server: ServerState = field(default_factory=ServerState)
    clients: dict[int, KeyStore] = field(default_factory=dict)
    authority: KeyStore = field(default_factory=KeyStore)

    def client(self, cid: int) -> KeyStore:
        store = self.clients.get(cid)
        if store is None:
            store = self.clients[cid] = KeyStore()
        return store

