"""The client side of homomorphic aggregation (both key modes), and the decrypting client.

A client answers the server's messages stage by stage:

* ``setup`` (client-held): :class:`Offer` -> :class:`Advertise` with a fresh
  X25519 public key and the id of the key it already holds, if any;
* ``keys`` (client-held, only the chosen holder): :class:`KeyRequest` ->
  :class:`KeyBundle`: generate the key if asked, seal it for each recipient;
* ``upload``: :class:`Go` -> :class:`Upload`: open the envelope or load the
  public context if one came with it, then encrypt ``[w * clip(x), w]``;
* ``decrypt`` (client-held, the designated decryptors): :class:`Aggregate` ->
  the plaintext sum, kept locally: :meth:`HEClient.result`. The server never
  receives it. In a deployment the server sends the aggregate ciphertext to
  every client; each decrypts and applies the same deterministic FedAvg step,
  so all clients hold the same new global model while the server holds only
  ciphertexts.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..base import SERVER, AggregateResult, ClientInput, Message, Party
from ..errors import ConfigurationError, DecodeError, IntegrityError, UnexpectedMessageError
from ..primitives import kex
from . import messages as m
from .codec import decode_slots, decrypt_chunks, load_chunks, plaintext_slots
from .errors import BelowMinClientsError
from .hybrid import apply_mask, pairwise_mask
from .keys import (
    KeyStore,
    generate_key,
    key_id_of,
    load_secret_context,
    load_server_context,
    open_secret_context,
    seal_secret_context,
)
from .parallel import encrypt_in_parallel
from .state import HESettings


def decrypt_aggregate(
    msg: m.Aggregate, store: KeyStore, settings: HESettings, dim: int
) -> AggregateResult:
    """Decrypt an aggregate with the key in ``store``, refusing below ``min_clients``.

    Shared by the decrypting client and the key authority.

    Raises:
        BelowMinClientsError: fewer than ``min_clients`` contributors.
        UnexpectedMessageError: the aggregate is under another key.
    """
    if len(msg.contributors) < settings.min_clients:
        raise BelowMinClientsError(
            f"refusing to decrypt an aggregate of {len(msg.contributors)} contributor(s); "
            f"min_clients is {settings.min_clients}",
            sender=SERVER,
        )
    if store.key_id is None or msg.key_id != store.key_id:
        raise UnexpectedMessageError("aggregate is under a key this party does not hold", sender=SERVER)
    params = settings.params
    vecs = load_chunks(store.context(), params, msg.chunks, dim + 1)
    total, weight = decode_slots(params, decrypt_chunks(vecs, params))
    return AggregateResult(total=total, total_weight=weight, contributors=tuple(sorted(msg.contributors)))


class HEClient(Party):
    """One sampled client of one round."""

    def __init__(
        self, client_id: int, round_index: int, data: ClientInput, settings: HESettings, store: KeyStore
    ) -> None:
        if data.weight > settings.params.max_weight:
            raise ConfigurationError(
                f"client {client_id} has weight {data.weight} above max_weight={settings.params.max_weight}; "
                "raise max_weight in the aggregation options"
            )
        self.party_id = client_id
        self._round = round_index
        self._input = data
        self._settings = settings
        self._store = store
        self._dim = int(data.vector.shape[0])
        self._limits = settings.limits(self._dim)
        self._sk: X25519PrivateKey | None = None
        self._uploaded = False
        self._result: AggregateResult | None = None
        #: Entries clipped to ``clip`` before encryption (a local statistic).
        self.clipped = 0
        #: Bytes of this client's upload (0 until it uploads).
        self.upload_bytes = 0

    # -- helpers -----------------------------------------------------------------
    def _check_round(self, msg: m.HEMessage) -> None:
        if msg.round_index != self._round:
            raise UnexpectedMessageError(f"message for round {msg.round_index} in round {self._round}", sender=SERVER)

    def _reply(self, stage: str, msg: m.HEMessage) -> list[Message]:
        return [Message(self.party_id, SERVER, stage, msg.encode())]

    def result(self) -> AggregateResult | None:
        """The decrypted aggregate, if this client was a decryptor and the round completed."""
        return self._result

    # -- protocol ----------------------------------------------------------------
    def receive(self, message: Message) -> list[Message]:
        if message.sender != SERVER:
            raise UnexpectedMessageError(f"client {self.party_id}: message from party {message.sender}")
        stage = message.stage
        if stage == "setup":
            return self._on_offer(m.Offer.decode(message.payload, self._limits))
        if stage == "keys":
            return self._on_key_request(m.KeyRequest.decode(message.payload, self._limits))
        if stage == "upload":
            return self._on_go(m.Go.decode(message.payload, self._limits))
        if stage == "decrypt":
            return self._on_aggregate(m.Aggregate.decode(message.payload, self._limits))
        raise UnexpectedMessageError(f"client {self.party_id}: unknown stage {stage!r}", sender=SERVER)

    def _on_offer(self, msg: m.Offer) -> list[Message]:
        self._check_round(msg)
        wanted = self._settings.key_mode == "client-held" or self._settings.pairwise_masks
        if not wanted or self._sk is not None:
            raise UnexpectedMessageError("unexpected offer", sender=SERVER)
        if msg.dim != self._dim:
            raise UnexpectedMessageError(f"server expects {msg.dim} entries, this update has {self._dim}", sender=SERVER)
        self._sk, pk = kex.generate_keypair()
        return self._reply("setup", m.Advertise(self._round, self._limits.fingerprint, pk, self._store.key_id or b""))

    def _on_key_request(self, msg: m.KeyRequest) -> list[Message]:
        self._check_round(msg)
        if self._sk is None or self._uploaded:
            raise UnexpectedMessageError("key request before set-up or after upload", sender=SERVER)
        params = self._settings.params
        if not msg.key_id:
            km = generate_key(params, "client-held")
            self._store.adopt(km.key_id, km.secret_context, load_secret_context(km.secret_context, params), self._round)
        elif msg.key_id != self._store.key_id:
            raise UnexpectedMessageError("asked to share a key this client does not hold", sender=SERVER)
        key_id, secret = self._store.key_id, self._store.context_bytes
        assert key_id is not None and secret is not None
        envelopes = []
        for cid, pk in msg.recipients:
            if cid == self.party_id:
                raise DecodeError("a client cannot be asked to send the key to itself", sender=SERVER)
            envelopes.append((cid, seal_secret_context(self._sk, pk, self._round, self.party_id, cid, key_id, secret)))
        return self._reply("keys", m.KeyBundle(self._round, self._limits.fingerprint, key_id, tuple(envelopes)))

    def _adopt_from_go(self, msg: m.Go) -> None:
        params = self._settings.params
        if self._settings.key_mode == "client-held":
            if msg.envelope:
                if self._sk is None or not msg.holder_public_key:
                    raise UnexpectedMessageError("key envelope without a key agreement", sender=SERVER)
                try:
                    blob, ctx = open_secret_context(
                        self._sk, msg.holder_public_key, self._round, msg.holder, self.party_id, msg.key_id,
                        msg.envelope, params,
                    )
                except IntegrityError as err:  # the holder (or a tampering relay) is at fault
                    raise IntegrityError(str(err), sender=msg.holder) from err
                self._store.adopt(msg.key_id, blob, ctx, self._round)
        elif msg.public_context:
            if key_id_of(msg.public_context) != msg.key_id:
                raise IntegrityError("public context does not match the announced key id", sender=SERVER)
            ctx = load_server_context(msg.public_context, params, need_public_key=True)
            self._store.adopt(msg.key_id, msg.public_context, ctx, self._round)
        if self._store.key_id != msg.key_id:
            raise UnexpectedMessageError("told to encrypt under a key this client does not hold", sender=SERVER)

    def _on_go(self, msg: m.Go) -> list[Message]:
        self._check_round(msg)
        if self._uploaded:
            raise UnexpectedMessageError("second upload request", sender=SERVER)
        if msg.dim != self._dim:
            raise UnexpectedMessageError(f"server expects {msg.dim} entries, this update has {self._dim}", sender=SERVER)
        self._adopt_from_go(msg)
        params = self._settings.params
        slots, self.clipped = plaintext_slots(params, self._input.vector, self._input.weight)
        if self._settings.pairwise_masks:
            slots = self._mask(msg, slots)
        elif msg.peers:
            raise UnexpectedMessageError("peer keys sent although pairwise masks are off", sender=SERVER)
        context_bytes = self._store.context_bytes
        assert context_bytes is not None
        chunks = encrypt_in_parallel(
            self._store.context(), context_bytes, params, slots,
            workers=self._settings.workers, threshold=self._settings.parallel_threshold,
        )
        self._uploaded = True
        out = self._reply("upload", m.Upload(self._round, self._limits.fingerprint, msg.key_id, tuple(chunks)))
        self.upload_bytes = len(out[0].payload)
        return out

    def _mask(self, msg: m.Go, slots: np.ndarray) -> np.ndarray:
        """Hide the quantized update under pairwise masks that cancel in the sum (:mod:`.hybrid`)."""
        if self._sk is None:
            raise UnexpectedMessageError("pairwise masks without a key agreement", sender=SERVER)
        if any(c == self.party_id for c, _ in msg.peers):
            raise DecodeError("a client is not its own peer", sender=SERVER)
        if len(msg.peers) + 1 < self._settings.min_clients:
            raise UnexpectedMessageError(
                f"only {len(msg.peers)} peer(s) to mask with; min_clients is {self._settings.min_clients}",
                sender=SERVER,
            )
        t = self._settings.params.plain_modulus
        mask = pairwise_mask(self._sk, self.party_id, msg.peers, self._round, t, slots.shape[0])
        return apply_mask(slots, mask, t)

    def _on_aggregate(self, msg: m.Aggregate) -> list[Message]:
        self._check_round(msg)
        if self._settings.key_mode != "client-held" or self._result is not None:
            raise UnexpectedMessageError("unexpected aggregate", sender=SERVER)
        self._result = decrypt_aggregate(msg, self._store, self._settings, self._dim)
        return []
