"""The key authority: the only holder of the secret key in ``key-authority`` mode.

It answers two messages from the server and nothing else:

* ``setup``: :class:`ContextRequest` -> :class:`Context`. It generates the key
  pair on first use (and again when the server asks for rotation) and
  publishes the public context: parameters and public key, no secret key.
* ``decrypt``: :class:`Aggregate` -> :class:`Release`. It checks the key id
  and that at least ``min_clients`` distinct clients contributed, decrypts the
  *sum*, and releases it to the server for the model-update step.

It never accepts an upload: an individual ciphertext has no message kind it
would decode. Its threat model (no collusion with the server; a malicious
server could relabel one client's ciphertext as an aggregate) is in
:mod:`.keys`.
"""

from __future__ import annotations

from ..base import AUTHORITY, SERVER, AggregateResult, Message, Party
from ..errors import UnexpectedMessageError
from . import messages as m
from .client import decrypt_aggregate
from .keys import KeyStore, generate_key, load_secret_context
from .state import HESettings


class HEAuthority(Party):
    """The decryptor of one round (its key persists in ``store`` across rounds)."""

    party_id = AUTHORITY

    def __init__(self, round_index: int, dim: int, settings: HESettings, store: KeyStore) -> None:
        self._round = round_index
        self._dim = dim
        self._settings = settings
        self._store = store
        self._limits = settings.limits(dim)
        self._result: AggregateResult | None = None
        #: Whether this round generated a new key pair.
        self.generated = False

    def result(self) -> AggregateResult | None:
        return self._result

    def receive(self, message: Message) -> list[Message]:
        if message.sender != SERVER:
            raise UnexpectedMessageError(f"authority: message from party {message.sender}; only the server may ask")
        if message.stage == "setup":
            return self._on_context_request(m.ContextRequest.decode(message.payload, self._limits))
        if message.stage == "decrypt":
            return self._on_aggregate(m.Aggregate.decode(message.payload, self._limits))
        raise UnexpectedMessageError(f"authority: nothing to do in stage {message.stage!r}", sender=SERVER)

    def _check_round(self, msg: m.HEMessage) -> None:
        if msg.round_index != self._round:
            raise UnexpectedMessageError(f"message for round {msg.round_index} in round {self._round}", sender=SERVER)

    def _on_context_request(self, msg: m.ContextRequest) -> list[Message]:
        self._check_round(msg)
        params = self._settings.params
        if msg.rotate or self._store.key_id is None:
            km = generate_key(params, "key-authority")
            ctx = load_secret_context(km.secret_context, params)
            self._store.adopt(km.key_id, km.secret_context, ctx, self._round, public_context=km.public_context)
            self.generated = True
        key_id = self._store.key_id
        assert key_id is not None
        reply = m.Context(self._round, self._limits.fingerprint, key_id, self._store.public_context)
        return [Message(AUTHORITY, SERVER, "setup", reply.encode())]

    def _on_aggregate(self, msg: m.Aggregate) -> list[Message]:
        self._check_round(msg)
        if self._result is not None:
            raise UnexpectedMessageError("second aggregate in one round", sender=SERVER)
        res = decrypt_aggregate(msg, self._store, self._settings, self._dim)
        self._result = res
        release = m.Release(
            self._round, self._limits.fingerprint, msg.key_id, res.contributors, res.total, res.total_weight
        )
        return [Message(AUTHORITY, SERVER, "decrypt", release.encode())]
