"""The aggregation server of homomorphic aggregation: relays keys, adds ciphertexts, holds no secret.

Stages (:data:`STAGES`), client-held keys:

``setup``
    :class:`Offer` to every sampled client; each answers :class:`Advertise`.
``keys``
    If no key exists, rotation is due, or no sampled client holds the current
    key, the lowest-id client is asked to generate one; otherwise the
    lowest-id holder is asked to seal the current key for the clients that
    lack it. The :class:`KeyBundle` comes back with envelopes the server
    cannot open.
``upload``
    :class:`Go` to every client that has (or is being sent) the key;
    :class:`Upload` back. Each upload is validated in full, then added.
``decrypt``
    :class:`Aggregate` to ``decryptors`` contributors. The server is done: it
    never sees a plaintext.

Key-authority: ``setup`` fetches the public context from the authority when
there is none or rotation is due (and, with pairwise masks, collects the
clients' X25519 keys as above); ``keys`` is empty; ``upload`` ships the
public context with :class:`Go` to clients that have not received it yet;
``decrypt`` sends the aggregate to the authority, which releases the sum.

The server's context never holds a secret key: it is built from a
parameters-only serialization (client-held) or the authority's public context,
both loaded through :func:`.keys.load_server_context`, which refuses any
context carrying a secret key.
"""

from __future__ import annotations

from ..base import AUTHORITY, SERVER, AggregateResult, Message, ServerObservation, ServerParty
from ..errors import IntegrityError, LocalProtocolError, RoundAbortedError, UnexpectedMessageError
from . import messages as m
from .codec import CiphertextSum
from .errors import ParameterMismatchError
from .keys import key_id_of, load_server_context, params_context_bytes
from .state import HESettings, ServerState

STAGES = ("setup", "keys", "upload", "decrypt")


class HEServer(ServerParty):
    party_id = SERVER

    def __init__(
        self, round_index: int, client_ids: tuple[int, ...], dim: int, settings: HESettings, state: ServerState
    ) -> None:
        self._round = round_index
        self._clients = client_ids
        self._dim = dim
        self._settings = settings
        self._state = state
        self._limits = settings.limits(dim)
        self._fp = settings.params.fingerprint
        self._stage = "idle"
        self._advertised: dict[int, m.Advertise] = {}
        self._holder: int | None = None
        self._new_key = False
        self._requested: tuple[int, ...] = ()
        self._bundle: m.KeyBundle | None = None
        self._participants: set[int] = set()
        self._uploads: dict[int, bytes] = {}
        self._sum: CiphertextSum | None = None
        self._transcript: list[Message] = []
        self._released: AggregateResult | None = None
        self._finished = False
        #: Whether a new key was generated in this round.
        self.key_generated = False

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def client_held(self) -> bool:
        return self._settings.key_mode == "client-held"

    def _abort(self, why: str) -> RoundAbortedError:
        self._stage = "aborted"
        return RoundAbortedError(why)

    # -- stage transitions -------------------------------------------------------------
    def start(self) -> list[Message]:
        if self._stage != "idle":
            raise LocalProtocolError("round already started")
        self._stage = "setup"
        st = self._state
        if self.client_held:
            if st.context is None:
                st.context = load_server_context(params_context_bytes(self._settings.params), self._settings.params,
                                                 need_public_key=False)
            offer = m.Offer(self._round, self._fp, self._dim, st.key_id or b"").encode()
            return [Message(SERVER, c, "setup", offer) for c in self._clients]
        out = []
        if self._settings.rotation_due(self._round, st.key_round):
            req = m.ContextRequest(self._round, self._fp, rotate=st.key_id is not None)
            out.append(Message(SERVER, AUTHORITY, "setup", req.encode()))
        if self._settings.pairwise_masks:  # clients need each other's X25519 keys for the masks
            offer = m.Offer(self._round, self._fp, self._dim, st.key_id or b"").encode()
            out += [Message(SERVER, c, "setup", offer) for c in self._clients]
        return out

    def end_stage(self) -> list[Message]:
        if self._stage == "setup":
            return self._open_keys() if self.client_held else self._open_upload()
        if self._stage == "keys":
            return self._open_upload()
        if self._stage == "upload":
            return self._open_decrypt()
        if self._stage == "decrypt":
            if self._released is None:
                raise self._abort("the key authority released no aggregate")
            self._finished = True
            self._stage = "done"
            return []
        raise LocalProtocolError(f"no stage to end in {self._stage!r}")

    def _open_keys(self) -> list[Message]:
        st, adv = self._state, self._advertised
        if not adv:
            raise self._abort("no client answered the set-up")
        holders = sorted(c for c, a in adv.items() if st.key_id and a.held_key_id == st.key_id)
        self._stage = "keys"
        if self._settings.rotation_due(self._round, st.key_round) or not holders:
            self._new_key = True
            self._holder = min(adv)
            key_id = b""
            self._participants = {self._holder}
        else:
            self._holder = holders[0]
            key_id = st.key_id or b""
            self._participants = set(holders)
        self._requested = tuple(c for c in sorted(adv) if c not in self._participants)
        if not self._requested and not self._new_key:
            return []
        recipients = tuple((c, adv[c].public_key) for c in self._requested)
        req = m.KeyRequest(self._round, self._fp, key_id, recipients)
        return [Message(SERVER, self._holder, "keys", req.encode())]

    def _open_upload(self) -> list[Message]:
        st = self._state
        if self.client_held:
            if self._new_key:
                if self._bundle is None:
                    raise self._abort(f"key generator {self._holder} sent no key")
                st.key_id, st.key_round = self._bundle.key_id, self._round
                self.key_generated = True
            envelopes = dict(self._bundle.envelopes) if self._bundle is not None else {}
            self._participants |= set(envelopes)
        else:
            if st.key_id is None:
                raise self._abort("the key authority published no key")
            self._participants = set(self._advertised) if self._settings.pairwise_masks else set(self._clients)
        if len(self._participants) < self._settings.min_clients:
            raise self._abort(
                f"only {len(self._participants)} client(s) can encrypt under the current key; "
                f"min_clients is {self._settings.min_clients}"
            )
        assert st.key_id is not None and st.context is not None
        self._sum = CiphertextSum(st.context, self._settings.params, self._dim + 1)
        self._stage = "upload"
        out = []
        masks = self._settings.pairwise_masks
        for c in sorted(self._participants):
            peers = tuple((p, self._advertised[p].public_key) for p in sorted(self._participants) if p != c) if masks else ()
            if self.client_held:
                env = envelopes.get(c, b"")
                holder_pk = self._advertised[self._holder].public_key if env and self._holder is not None else b""
                holder = self._holder if env and self._holder is not None else -1
                go = m.Go(self._round, self._fp, self._dim, st.key_id, holder, holder_pk, env, b"", peers)
            else:
                ctx = b"" if c in st.delivered else st.public_context
                go = m.Go(self._round, self._fp, self._dim, st.key_id, -1, b"", b"", ctx, peers)
            out.append(Message(SERVER, c, "upload", go.encode()))
        return out

    def _open_decrypt(self) -> list[Message]:
        contributors = tuple(sorted(self._uploads))
        if self._settings.pairwise_masks and set(contributors) != self._participants:
            missing = sorted(self._participants - set(contributors))
            raise self._abort(
                f"masked participant(s) {missing} did not upload: their masks cannot cancel and this mode "
                "has no dropout recovery (see protocols/he/hybrid.py)"
            )
        if len(contributors) < self._settings.min_clients:
            raise self._abort(
                f"only {len(contributors)} upload(s) arrived; min_clients is {self._settings.min_clients}"
            )
        assert self._sum is not None and self._state.key_id is not None
        agg = m.Aggregate(self._round, self._fp, self._state.key_id, contributors, tuple(self._sum.serialize()))
        payload = agg.encode()
        if self.client_held:
            self._finished = True
            self._stage = "done"
            return [Message(SERVER, c, "decrypt", payload) for c in contributors[: self._settings.decryptors]]
        self._stage = "decrypt"
        return [Message(SERVER, AUTHORITY, "decrypt", payload)]

    # -- receiving -----------------------------------------------------------------------
    def receive(self, message: Message) -> list[Message]:
        stage, sender = message.stage, message.sender
        self._transcript.append(message)  # everything the server received, valid or not
        if stage != self._stage:
            raise UnexpectedMessageError(f"server: {stage!r} message in stage {self._stage!r}", sender=sender)
        if sender == AUTHORITY and not self.client_held and stage in ("setup", "decrypt"):
            self._on_authority(message)
        elif sender in self._clients:
            self._on_client(message)
        else:
            raise UnexpectedMessageError(f"server: message from unexpected party {sender}", sender=sender)
        return []

    def _check_round(self, msg: m.HEMessage, sender: int) -> None:
        if msg.round_index != self._round:
            raise UnexpectedMessageError(f"message for round {msg.round_index} in round {self._round}", sender=sender)

    def _on_authority(self, message: Message) -> None:
        st, params = self._state, self._settings.params
        if message.stage == "setup":
            ctx_msg = m.Context.decode(message.payload, self._limits)
            self._check_round(ctx_msg, AUTHORITY)
            if key_id_of(ctx_msg.public_context) != ctx_msg.key_id:
                raise IntegrityError("public context does not match its key id", sender=AUTHORITY)
            ctx = load_server_context(ctx_msg.public_context, params, need_public_key=True)
            if ctx_msg.key_id != st.key_id:
                st.delivered = set()
                self.key_generated = True
            st.key_id, st.key_round, st.context, st.public_context = (
                ctx_msg.key_id, self._round, ctx, ctx_msg.public_context,
            )
            return
        rel = m.Release.decode(message.payload, self._limits)
        self._check_round(rel, AUTHORITY)
        if rel.key_id != st.key_id or rel.contributors != tuple(sorted(self._uploads)) or self._released:
            raise UnexpectedMessageError("release does not match the aggregate sent", sender=AUTHORITY)
        self._released = AggregateResult(rel.total, rel.total_weight, rel.contributors)

    def _on_client(self, message: Message) -> None:
        sender, stage = message.sender, message.stage
        if stage == "setup" and (self.client_held or self._settings.pairwise_masks):
            adv = m.Advertise.decode(message.payload, self._limits)
            self._check_round(adv, sender)
            if sender in self._advertised:
                raise UnexpectedMessageError(f"second advertisement from client {sender}", sender=sender)
            self._advertised[sender] = adv
        elif stage == "keys" and self.client_held:
            if sender != self._holder or self._bundle is not None:
                raise UnexpectedMessageError(f"key bundle from client {sender}, not the holder", sender=sender)
            bundle = m.KeyBundle.decode(message.payload, self._limits)
            self._check_round(bundle, sender)
            if not self._new_key and bundle.key_id != self._state.key_id:
                raise ParameterMismatchError("holder sent another key than the current one", sender=sender)
            if {c for c, _ in bundle.envelopes} != set(self._requested):
                raise UnexpectedMessageError("key bundle does not address the requested clients", sender=sender)
            self._bundle = bundle
        elif stage == "upload":
            if sender not in self._participants or sender in self._uploads:
                raise UnexpectedMessageError(f"unexpected upload from client {sender}", sender=sender)
            up = m.Upload.decode(message.payload, self._limits)
            self._check_round(up, sender)
            if up.key_id != self._state.key_id:
                raise ParameterMismatchError(
                    f"client {sender} encrypted under another key ({up.key_id.hex()})", sender=sender
                )
            assert self._sum is not None
            self._sum.add(up.chunks)  # validates every chunk before adding any
            self._uploads[sender] = message.payload
            if not self.client_held:
                self._state.delivered.add(sender)
        else:
            raise UnexpectedMessageError(f"server: no client message expected in stage {stage!r}", sender=sender)

    # -- outputs ------------------------------------------------------------------------
    def released(self) -> AggregateResult | None:
        """Key-authority mode: the sum the authority released to the server."""
        return self._released

    def observation(self) -> ServerObservation:
        rel = self._released
        return ServerObservation(
            protocol=self._settings.name,
            contributors=tuple(sorted(self._uploads)),
            aggregate=rel.total if rel is not None else None,
            total_weight=rel.total_weight if rel is not None else None,
            ciphertexts=dict(self._uploads),
            transcript=tuple(self._transcript),
        )
