"""Who holds which key: the two key modes, and the secret-key hand-over between clients.

**client-held** (the server never sees plaintext, not even the aggregate).
One sampled client generates the CKKS/BFV key for the run (again every
``rotate_every`` rounds, or whenever no sampled client holds the current key)
and hands the *secret-key context* to every other client that needs it, each
copy sealed with AES-256-GCM under a key agreed with that client by X25519 +
HKDF-SHA256 (:mod:`..primitives.kex`, :mod:`..primitives.aead`); the associated
data binds round, stage, sender, recipient and key id. The server relays the
envelopes and learns nothing from them. It holds only a *parameters-only*
context (no public, secret, relinearization or Galois key), enough to
deserialize and add ciphertexts and nothing more. Clients encrypt with the
secret key (symmetric encryption: half the cost of public-key encryption).

Threat model: honest-but-curious server; clients honest with respect to each
other. **Any client colluding with the server decrypts every other client's
upload**, because all clients share one secret key (the same exposure as
NVFlare's provisioned key, peers.md §2.2). The mitigations: the key-authority
mode below (no client holds the key), and rotation (a client that leaves loses
access to later rounds). A malicious server could also substitute X25519
public keys and read the envelopes; pin long-term client identity keys (a PKI)
if the server is not trusted to relay them faithfully.

**key-authority**. A separate decryptor (party :data:`AUTHORITY`) generates the
key pair and keeps the secret key. The server relays the *public* context
(public key, no secret key) once per key to each client, who encrypts with the
public key; the server adds; the authority receives only the aggregate
ciphertext and the contributor list, refuses below ``min_clients``, and
releases the decrypted sum to the server. Threat model: server and authority
do not collude; the server learns the sum (as with masking), the authority
learns the sum and never sees an individual ciphertext. A *malicious* server
could present one client's ciphertext as an "aggregate" with a forged
contributor list; the authority cannot tell (mitigation: pairwise masks under
the encryption, see ``docs/homomorphic-aggregation.md``).

Key ids are 16-byte SHA-256 digests of the serialized context a party
receives, so a recipient can check that what it loaded is the key the server
announced, and an upload labelled with another key id is refused before it is
parsed (a ciphertext under another key but with the same parameters is
otherwise indistinguishable: that is IND-CPA).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import DecodeError, IntegrityError
from ..primitives import aead, kex
from .errors import ParameterMismatchError, SecretKeyExposureError
from .params import HEParams

PROTOCOL_NAME = "securefed-he"
PROTOCOL_VERSION = 1
KEY_ID_BYTES = 16
#: Limits on serialized contexts (a secret-key context at N=16384 is ~0.5 MB).
MAX_CONTEXT_BYTES = 8 * 1024 * 1024
KEY_MODES = ("client-held", "key-authority")


def key_id_of(context_bytes: bytes) -> bytes:
    """The id of a key: a digest of the serialized context that carries it."""
    return hashlib.sha256(b"securefed/he/key-id/v1|" + context_bytes).digest()[:KEY_ID_BYTES]


def _load_context(blob: bytes, params: HEParams, what: str) -> ts.Context:
    if not isinstance(blob, bytes) or not blob:
        raise DecodeError(f"{what} must be non-empty bytes")
    if len(blob) > MAX_CONTEXT_BYTES:
        raise DecodeError(f"{what} of {len(blob)} bytes exceeds the limit of {MAX_CONTEXT_BYTES}")
    try:
        ctx = ts.context_from(blob, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as err:
        raise DecodeError(f"unparsable {what}: {err}") from err
    if tuple(ctx.data.seal_context().first_parms_id()) != params.parms_id:
        raise ParameterMismatchError(f"{what} was made for other encryption parameters")
    if params.scheme == "ckks":
        ctx.global_scale = params.scale
    return ctx


def load_server_context(blob: bytes, params: HEParams, *, need_public_key: bool) -> ts.Context:
    """Load a context meant for the server (or for encryption-only clients); refuse secret keys.

    Raises:
        SecretKeyExposureError: the context carries a secret key.
        ParameterMismatchError, DecodeError: wrong parameters or malformed bytes.
    """
    ctx = _load_context(blob, params, "public context")
    if ctx.is_private():
        raise SecretKeyExposureError("a context sent to the server carries a secret key; refusing to load it")
    if need_public_key:
        try:
            has_pk = bool(ctx.data.has_public_key())
        except ValueError:  # TenSEAL raises for symmetric-only contexts
            has_pk = False
        if not has_pk:
            raise ParameterMismatchError("public context carries no public key to encrypt with")
    return ctx


def load_secret_context(blob: bytes, params: HEParams) -> ts.Context:
    """Load a client's or the authority's secret-key context."""
    ctx = _load_context(blob, params, "secret context")
    if not ctx.is_private():
        raise ParameterMismatchError("secret context carries no secret key")
    return ctx


def params_context_bytes(params: HEParams) -> bytes:
    """A context with the parameters only, no key of any kind: what a client-held server needs.

    The throw-away secret key generated to build it is discarded with the object.
    """
    return params.new_context(symmetric=True).serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


@dataclass(frozen=True)
class KeyMaterial:
    """A freshly generated key: the secret-bearing context and what may be published.

    Attributes:
        secret_context: serialized context with the secret key (never leaves the key holders).
        public_context: serialized context without a secret key: parameters plus the
            public key (key-authority) or parameters only (client-held).
        key_id: ``key_id_of(secret_context)`` for client-held keys (recipients verify it),
            ``key_id_of(public_context)`` for authority keys (the server and clients verify it).
    """

    secret_context: bytes
    public_context: bytes
    key_id: bytes

    def __repr__(self) -> str:  # never print key material
        return f"KeyMaterial(key_id={self.key_id.hex()})"


def generate_key(params: HEParams, mode: str) -> KeyMaterial:
    """Generate the run's (or epoch's) key for ``mode``."""
    if mode == "client-held":
        ctx = params.new_context(symmetric=True)
        secret = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
        return KeyMaterial(secret, params_context_bytes(params), key_id_of(secret))
    if mode == "key-authority":
        ctx = params.new_context(symmetric=False)
        secret = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
        public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        return KeyMaterial(secret, public, key_id_of(public))
    raise ValueError(f"unknown key mode {mode!r}")


def _envelope_key(
    sk: X25519PrivateKey, peer_public: bytes, round_index: int, me: int, peer: int
) -> bytes:
    ctx = kex.KeyContext(PROTOCOL_NAME, PROTOCOL_VERSION, round_index, "he-secret-key-transfer")
    return kex.agree(sk, peer_public, ctx, me, peer)


def _envelope_ad(round_index: int, holder: int, recipient: int, key_id: bytes) -> bytes:
    return aead.associated_data(PROTOCOL_NAME, round_index, "keys", holder, recipient) + b"|key-id|" + key_id


def seal_secret_context(
    sk: X25519PrivateKey, recipient_public: bytes, round_index: int, holder: int, recipient: int,
    key_id: bytes, secret_context: bytes,
) -> bytes:
    """Encrypt the secret-key context for one recipient (the server relays the result)."""
    key = _envelope_key(sk, recipient_public, round_index, holder, recipient)
    return aead.encrypt(key, secret_context, _envelope_ad(round_index, holder, recipient, key_id))


def open_secret_context(
    sk: X25519PrivateKey, holder_public: bytes, round_index: int, holder: int, recipient: int,
    key_id: bytes, envelope: bytes, params: HEParams,
) -> tuple[bytes, ts.Context]:
    """Decrypt and load the secret-key context a holder sent; check it is the announced key.

    Raises:
        IntegrityError: the envelope fails authentication or holds another key than ``key_id``.
        DecodeError, ParameterMismatchError: the context inside is malformed or for other parameters.
    """
    key = _envelope_key(sk, holder_public, round_index, recipient, holder)
    blob = aead.decrypt(
        key, envelope, _envelope_ad(round_index, holder, recipient, key_id), max_plaintext=MAX_CONTEXT_BYTES
    )
    if key_id_of(blob) != key_id:
        raise IntegrityError("the secret context received is not the key the server announced")
    return blob, load_secret_context(blob, params)


class KeyStore:
    """What one party keeps between rounds (a device's disk, simulated in memory).

    Holds at most one key: its id, its serialized context and the loaded
    TenSEAL context (cached so a party does not re-parse it every round).
    """

    def __init__(self) -> None:
        self.key_id: bytes | None = None
        self.context_bytes: bytes | None = None
        self.created_round: int | None = None
        #: The key authority also keeps the public context it publishes.
        self.public_context: bytes = b""
        self._ctx: ts.Context | None = None

    def adopt(
        self, key_id: bytes, context_bytes: bytes, ctx: ts.Context, round_index: int, public_context: bytes = b""
    ) -> None:
        self.key_id = key_id
        self.context_bytes = context_bytes
        self.created_round = round_index
        self.public_context = public_context
        self._ctx = ctx

    def context(self) -> ts.Context:
        if self._ctx is None:
            raise LookupError("no key held")
        return self._ctx

    def __repr__(self) -> str:
        return f"KeyStore(key_id={self.key_id.hex() if self.key_id else None})"
