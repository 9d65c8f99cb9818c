"""The SecAgg / SecAgg+ client: a sans-I/O state machine.

Follows Bonawitz et al. (CCS 2017, Fig. 4) with the neighbour graph of Bell
et al. (CCS 2020). Per round the client holds two fresh X25519 key pairs
(``c`` for share encryption, ``s`` for masking), a fresh self-mask seed ``b``,
and its update. Its stage advances only along :func:`client_transitions`; any
other (stage, message kind) pair raises
:class:`~securefed.protocols.errors.UnexpectedMessageError` and leaves the
client unchanged. Handlers validate everything first and commit state last.

Client-side rules (each refusal raises and reveals nothing):

* **at least t live holders** around it at every stage (:class:`TooFewPeersError`);
* **distinct keys**: a public key seen twice, or equal to its own, is refused
  (:class:`DuplicateKeyError`);
* **only known peers**: keys only from graph neighbours, bundles only from peers
  whose keys it received, share requests only about peers it holds shares of;
* **never both shares of one peer**: a request naming a peer as survivor and
  dropped, its own key share, a rejected peer, or (authenticated) a survivor
  list other than the one it signed is refused (:class:`ShareReleaseRefusedError`);
* **authenticated variant**: peers' key signatures and at least ``t``
  neighbours' consistency signatures must verify against the PKI directory.

A bundle that fails AES-GCM authentication or names the wrong parties is not
fatal: the client drops that peer from its masks and reports it in
``MaskedInput.rejected``; the server then excludes the peer (see
:mod:`.server`). Errors caused by the server's own messages carry
``sender=SERVER`` so a transport aborts the round instead of blaming a client.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..base import SERVER, ClientInput, Message, Party
from ..csprng import SEED_BYTES
from ..encoding import ChunkQuantizer
from ..errors import (
    ConfigurationError,
    DecodeError,
    IntegrityError,
    RemoteProtocolError,
    UnexpectedMessageError,
)
from ..primitives import aead, kex, shamir, sign
from .config import SecAggConfig, Stopwatch
from .errors import (
    DuplicateKeyError,
    NonFiniteUpdateError,
    ShareReleaseRefusedError,
    TooFewPeersError,
)
from .keys import (
    advertise_message,
    bundle_ad,
    consistency_message,
    encryption_context,
    mask_context,
    pair_negated,
    seed_commitment,
)
from .masking import MaskStream, encode_and_mask
from .messages import (
    STAGE_OF,
    AdvertiseKeys,
    AdvertiseRequest,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    Kind,
    Limits,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    ShareBundle,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    peek_kind,
)
from .params import NeighbourGraph


class ClientStage(Enum):
    AWAIT_ADVERTISE = "await_advertise"
    AWAIT_SHARE_KEYS = "await_share_keys"
    AWAIT_MASKED_INPUT = "await_masked_input"
    AWAIT_CONSISTENCY = "await_consistency"
    AWAIT_UNMASK = "await_unmask"
    DONE = "done"


def client_transitions(authenticated: bool) -> dict[tuple[ClientStage, Kind], ClientStage]:
    """The client's transition table: (stage, incoming kind) -> next stage. Nothing else is accepted."""
    after_masked = ClientStage.AWAIT_CONSISTENCY if authenticated else ClientStage.AWAIT_UNMASK
    table = {
        (ClientStage.AWAIT_ADVERTISE, Kind.ADVERTISE_REQUEST): ClientStage.AWAIT_SHARE_KEYS,
        (ClientStage.AWAIT_SHARE_KEYS, Kind.SHARE_KEYS_REQUEST): ClientStage.AWAIT_MASKED_INPUT,
        (ClientStage.AWAIT_MASKED_INPUT, Kind.MASKED_INPUT_REQUEST): after_masked,
        (ClientStage.AWAIT_UNMASK, Kind.UNMASK_REQUEST): ClientStage.DONE,
    }
    if authenticated:
        table[(ClientStage.AWAIT_CONSISTENCY, Kind.CONSISTENCY_REQUEST)] = ClientStage.AWAIT_UNMASK
    return table


def _server_fault(cls: type[RemoteProtocolError], msg: str) -> RemoteProtocolError:
    return cls(msg, sender=SERVER)


class SecAggClient(Party):
    """One client of one round.

    Args:
        client_id: this client's id (non-negative).
        round_index: the round it expects.
        data: its update and weight.
        config: the run's configuration (identical on every party).
        identity: its long-term Ed25519 key (authenticated variant only).
        directory: client id -> Ed25519 public key, from the PKI (authenticated only).
    """

    def __init__(
        self,
        client_id: int,
        round_index: int,
        data: ClientInput,
        config: SecAggConfig,
        *,
        identity: Ed25519PrivateKey | None = None,
        directory: Mapping[int, bytes] | None = None,
    ) -> None:
        if config.authenticated and (identity is None or directory is None):
            raise ValueError("the authenticated variant needs the client's identity key and the PKI directory")
        self.party_id = client_id
        self.timings = Stopwatch()
        self._round = round_index
        self._data = data
        self._cfg = config
        self._identity = identity
        self._directory = dict(directory or {})
        self._table = client_transitions(config.authenticated)
        self._stage = ClientStage.AWAIT_ADVERTISE
        self._length = data.vector.shape[0] + 2
        self._handlers: dict[Kind, Callable[[bytes], list[Message]]] = {
            Kind.ADVERTISE_REQUEST: self._on_advertise,
            Kind.SHARE_KEYS_REQUEST: self._on_share_keys,
            Kind.MASKED_INPUT_REQUEST: self._on_masked_input,
            Kind.CONSISTENCY_REQUEST: self._on_consistency,
            Kind.UNMASK_REQUEST: self._on_unmask,
        }
        # Round state, filled stage by stage.
        self._limits = Limits(config.decoder_client_bound(), self._length, config.encoder.modulus_bits)
        self._graph: NeighbourGraph | None = None
        self._t = 0
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._own_keys: tuple[bytes, bytes] = (b"", b"")
        self._seed = b""
        self._peers: dict[int, PeerKeys] = {}
        self._enc_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[int, int]] = {}
        self._accepted: frozenset[int] = frozenset()
        self._rejected: tuple[int, ...] = ()
        self._signed: tuple[int, ...] | None = None
        self._released: dict[int, str] = {}
        self.clipped = 0

    @property
    def stage(self) -> ClientStage:
        return self._stage

    # -- dispatch ------------------------------------------------------------

    def receive(self, message: Message) -> list[Message]:
        if message.sender != SERVER or message.recipient != self.party_id:
            raise UnexpectedMessageError(
                f"client {self.party_id}: messages come only from the server", sender=message.sender
            )
        try:
            kind = peek_kind(message.payload)
        except DecodeError as err:
            err.sender = SERVER
            raise
        nxt = self._table.get((self._stage, kind))
        if nxt is None:
            raise _server_fault(
                UnexpectedMessageError, f"client {self.party_id}: {kind.name} not accepted in stage {self._stage.value}"
            )
        if message.stage != STAGE_OF[kind]:
            raise _server_fault(
                UnexpectedMessageError, f"client {self.party_id}: {kind.name} labelled with stage {message.stage!r}"
            )
        try:
            replies = self._handlers[kind](message.payload)
        except DecodeError as err:
            if err.sender is None:
                err.sender = SERVER
            raise
        self._stage = nxt
        return replies

    def _reply(self, kind: Kind, payload: bytes) -> list[Message]:
        return [Message(self.party_id, SERVER, STAGE_OF[kind], payload)]

    def _check_round(self, round_index: int) -> None:
        if round_index != self._round:
            raise _server_fault(UnexpectedMessageError, f"message for round {round_index} in round {self._round}")

    @property
    def _g(self) -> NeighbourGraph:
        assert self._graph is not None
        return self._graph

    def _keys(self) -> tuple[X25519PrivateKey, X25519PrivateKey]:
        assert self._c_sk is not None and self._s_sk is not None
        return self._c_sk, self._s_sk

    # -- AdvertiseKeys -----------------------------------------------------------

    def _on_advertise(self, payload: bytes) -> list[Message]:
        req = AdvertiseRequest.decode(payload, self._limits)
        self._check_round(req.round_index)
        me = self.party_id
        if me not in req.clients:
            raise _server_fault(UnexpectedMessageError, f"client {me} is not in the announced client list")
        if req.length != self._length or req.modulus_bits != self._cfg.encoder.modulus_bits:
            raise _server_fault(
                UnexpectedMessageError,
                f"server announced length {req.length} / {req.modulus_bits}-bit ring, "
                f"expected {self._length} / {self._cfg.encoder.modulus_bits}",
            )
        params = self._cfg.parameters(len(req.clients))
        if (req.k, req.threshold) != (params.k, params.threshold):
            raise _server_fault(
                UnexpectedMessageError,
                f"server announced k={req.k}, t={req.threshold}; this configuration requires "
                f"k={params.k}, t={params.threshold}",
            )
        with self.timings("key_agreement"):
            c_sk, c_pk = kex.generate_keypair()
            s_sk, s_pk = kex.generate_keypair()
        seed = os.urandom(SEED_BYTES)
        protocol = self._cfg.protocol
        commitment = seed_commitment(protocol, self._round, me, seed)
        signature = b""
        if self._identity is not None:
            signature = sign.sign(self._identity, advertise_message(protocol, self._round, me, c_pk, s_pk, commitment))
        graph = NeighbourGraph(req.clients, params.k, req.graph_seed)
        # commit
        self._graph, self._t = graph, params.threshold
        self._limits = Limits(len(req.clients), self._length, self._cfg.encoder.modulus_bits)
        self._c_sk, self._s_sk, self._seed = c_sk, s_sk, seed
        self._own_keys = (c_pk, s_pk)
        return self._reply(Kind.ADVERTISE_KEYS, AdvertiseKeys(self._round, c_pk, s_pk, commitment, signature).encode())

    # -- ShareKeys ---------------------------------------------------------------

    def _on_share_keys(self, payload: bytes) -> list[Message]:
        req = ShareKeysRequest.decode(payload, self._limits)
        self._check_round(req.round_index)
        me, g, t = self.party_id, self._g, self._t
        neighbours = g.neighbours(me)
        peers = {p.client: p for p in req.peers}
        stray = set(peers) - neighbours
        if stray:
            raise _server_fault(UnexpectedMessageError, f"keys of non-neighbours {sorted(stray)} sent to client {me}")
        if len(peers) + 1 < t:
            raise _server_fault(TooFewPeersError, f"client {me}: {len(peers)} live neighbours, need {t - 1}")
        keys = [k for p in req.peers for k in (p.enc_public, p.mask_public)] + list(self._own_keys)
        if len(set(keys)) != len(keys):
            raise _server_fault(DuplicateKeyError, f"client {me}: a public key appears twice among its peers")
        protocol = self._cfg.protocol
        if self._cfg.authenticated:
            for p in req.peers:
                if p.client not in self._directory:
                    raise _server_fault(IntegrityError, f"peer {p.client} has no key in the PKI directory")
                msg = advertise_message(protocol, self._round, p.client, p.enc_public, p.mask_public, p.commitment)
                sign.verify(self._directory[p.client], msg, p.signature)
        ctx = encryption_context(protocol, self._round)
        with self.timings("key_agreement"):
            c_sk, s_sk = self._keys()
            enc_keys = {j: kex.agree(c_sk, p.enc_public, ctx, me, j) for j, p in peers.items()}
        with self.timings("share_generation"):
            holders = sorted([*peers, me])
            xs = [h + 1 for h in holders]
            s_bytes = kex.private_bytes(s_sk)
            seed_shares, key_shares = shamir.split_many([self._seed, s_bytes], t, xs)
            out = []
            for j in sorted(peers):
                bundle = ShareBundle(me, j, self._round, seed_shares[j + 1], key_shares[j + 1]).encode()
                ct = aead.encrypt(enc_keys[j], bundle, bundle_ad(protocol, self._round, me, j))
                out.append(EncryptedShare(j, ct))
        # commit
        self._peers, self._enc_keys = peers, enc_keys
        self._held = {me: (seed_shares[me + 1], key_shares[me + 1])}
        return self._reply(Kind.SHARE_KEYS, ShareKeys(self._round, tuple(out)).encode())

    # -- MaskedInputCollection ---------------------------------------------------

    def _on_masked_input(self, payload: bytes) -> list[Message]:
        req = MaskedInputRequest.decode(payload, self._limits)
        self._check_round(req.round_index)
        me, t, protocol = self.party_id, self._t, self._cfg.protocol
        held: dict[int, tuple[int, int]] = {}
        rejected = []
        with self.timings("share_decryption"):
            for es in req.shares:
                j = es.peer
                if j not in self._peers:
                    raise _server_fault(UnexpectedMessageError, f"bundle from {j}, whose keys client {me} never received")
                try:
                    raw = aead.decrypt(self._enc_keys[j], es.ciphertext, bundle_ad(protocol, self._round, j, me))
                    bundle = ShareBundle.decode(raw)
                    if (bundle.sender, bundle.recipient, bundle.round_index) != (j, me, self._round):
                        raise IntegrityError("bundle names the wrong parties or round")
                except (IntegrityError, DecodeError):
                    rejected.append(j)
                    continue
                held[j] = (bundle.seed_share, bundle.key_share)
        if len(held) + 1 < t:
            raise _server_fault(TooFewPeersError, f"client {me}: {len(held)} valid bundles, need {t - 1}")
        x = self._data.vector
        cfg = self._cfg
        enc = cfg.encoder
        weight = float(self._data.weight)
        if not 0 <= weight <= enc.max_weight:
            raise ConfigurationError(f"client {me}: weight {weight} exceeds max_weight={enc.max_weight}")
        with self.timings("key_agreement"):
            ctx = mask_context(protocol, self._round)
            streams = [MaskStream(self._seed)]
            s_sk = self._keys()[1]
            for j in sorted(held):
                seed = kex.agree(s_sk, self._peers[j].mask_public, ctx, me, j)
                streams.append(MaskStream(seed, negate=pair_negated(me, j)))
        with self.timings("encoding_and_masking"):
            n = self._limits.max_clients
            try:
                clipped = ChunkQuantizer(enc, weight, 1).count_clipped(x)
            except ValueError as err:
                raise NonFiniteUpdateError(f"client {me}: update contains NaN or Inf; refusing to encode") from err
            u = secrets.randbits(32) * 2.0**-32
            w_entry = int(np.floor(weight * enc.clip * 2.0**enc.scale_bits + u))
            tail = np.array([w_entry, min(clipped, cfg.count_cap(n))], dtype=np.int64)
            y, _ = encode_and_mask(
                x,
                tail,
                encoder=enc,
                weight=weight,
                rounding_seed=os.urandom(SEED_BYTES),
                streams=streams,
                threads=cfg.threads,
                clipped=clipped,
            )
        with self.timings("serialization"):
            body = MaskedInput(self._round, tuple(sorted(rejected)), y).encode()
        # commit
        held[me] = self._held[me]
        self._held = held
        self._accepted = frozenset(held) - {me}
        self._rejected = tuple(sorted(rejected))
        self.clipped = clipped
        return self._reply(Kind.MASKED_INPUT, body)

    # -- ConsistencyCheck (authenticated) -----------------------------------------

    def _check_survivors(self, survivors: tuple[int, ...]) -> None:
        me, g = self.party_id, self._g
        s = set(survivors)
        if me not in s:
            raise _server_fault(ShareReleaseRefusedError, f"client {me} sent its input but is not listed as survivor")
        bad = (s & g.neighbours(me)) - self._accepted
        if bad:
            raise _server_fault(
                ShareReleaseRefusedError,
                f"client {me}: survivors {sorted(bad)} never delivered a valid bundle to it (rejected or unseen)",
            )
        live = len(s & g.holders(me))
        if live < self._t:
            raise _server_fault(TooFewPeersError, f"client {me}: {live} surviving holders, need {self._t}")

    def _on_consistency(self, payload: bytes) -> list[Message]:
        req = ConsistencyRequest.decode(payload, self._limits)
        self._check_round(req.round_index)
        self._check_survivors(req.survivors)
        assert self._identity is not None
        sig = sign.sign(self._identity, consistency_message(self._cfg.protocol, self._round, req.survivors))
        self._signed = req.survivors
        return self._reply(Kind.CONSISTENCY_SIGNATURE, ConsistencySignature(self._round, sig).encode())

    # -- Unmasking -----------------------------------------------------------------

    def _on_unmask(self, payload: bytes) -> list[Message]:
        req = UnmaskRequest.decode(payload, self._limits)
        self._check_round(req.round_index)
        me, g = self.party_id, self._g
        both = set(req.survivors) & set(req.dropped)
        if both:
            raise _server_fault(
                ShareReleaseRefusedError,
                f"client {me} asked for both the self-mask and the key share of {sorted(both)}: refused",
            )
        if me in req.dropped:
            raise _server_fault(ShareReleaseRefusedError, f"client {me} asked to reveal its own masking key")
        unknown = set(req.dropped) - self._accepted
        if unknown:
            raise _server_fault(ShareReleaseRefusedError, f"client {me} holds no valid shares of {sorted(unknown)}")
        self._check_survivors(req.survivors)
        if self._cfg.authenticated:
            if req.survivors != self._signed:
                raise _server_fault(ShareReleaseRefusedError, f"client {me}: survivor list differs from the one it signed")
            msg = consistency_message(self._cfg.protocol, self._round, req.survivors)
            signers = [s for s, _ in req.signatures if s in g.holders(me) and s in req.survivors]
            for signer, sig in req.signatures:
                if signer not in self._directory:
                    raise _server_fault(IntegrityError, f"signer {signer} has no key in the PKI directory")
                sign.verify(self._directory[signer], msg, sig)
            if len(signers) < self._t:
                raise _server_fault(TooFewPeersError, f"client {me}: {len(signers)} consistency signatures, need {self._t}")
        survivors = set(req.survivors)
        for j in survivors & set(self._held):
            if self._released.get(j, "seed") != "seed":
                raise _server_fault(ShareReleaseRefusedError, f"key share of {j} already released")
        for j in req.dropped:
            if self._released.get(j, "key") != "key":
                raise _server_fault(ShareReleaseRefusedError, f"seed share of {j} already released")
        seed_shares = tuple((j, self._held[j][0]) for j in sorted(survivors & set(self._held)))
        key_shares = tuple((j, self._held[j][1]) for j in req.dropped)
        # commit
        for j, _ in seed_shares:
            self._released[j] = "seed"
        for j, _ in key_shares:
            self._released[j] = "key"
        return self._reply(Kind.UNMASK_RESPONSE, UnmaskResponse(self._round, seed_shares, key_shares).encode())
