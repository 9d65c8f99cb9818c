"""Ciphertexts of one update: chunking, strict loading, summing, decrypting.

A client's plaintext is ``[w * clip(x), w]``: the update scaled by its weight,
plus the weight itself in one extra slot, so the decryptor learns
``sum w_i x_i`` and ``sum w_i`` and nobody learns an individual weight (the
same trick as the masking protocols, :mod:`securefed.protocols.encoding`).

The vector is cut into chunks of exactly the slot count, one ciphertext each.
TenSEAL would otherwise pack a longer vector into several ciphertexts itself
and print a warning from C++ on stdout (NVFlare issue #2687); and chunks let
the server validate and add ciphertext by ciphertext. Each chunk travels as
TenSEAL's serialization of the ciphertext **without its context** (the context
travels once per key set-up, :mod:`.keys`).

:func:`load_chunk` is the trust boundary for ciphertext bytes: a size limit
before parsing, TenSEAL/SEAL parsing (SEAL validates the ciphertext against the
context's parameters), then our own checks of everything SEAL accepts but an
addition-only sum must not: the length, one ciphertext of two polynomials, the
data-level parameter id, the NTT form and the CKKS scale. Any failure raises
before the chunk is added to anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import tenseal as ts

from ..csprng import KeyStream
from ..errors import DecodeError
from .errors import ParameterMismatchError
from .params import HEParams

#: ``ts.CKKSVector | ts.BFVVector`` (TenSEAL ships no type information).
HEVector: TypeAlias = Any


def plaintext_slots(params: HEParams, vector: np.ndarray, weight: float) -> tuple[np.ndarray, int]:
    """The client's plaintext ``[w * clip(x), w]`` as CKKS floats or BFV integers.

    Returns:
        The slot values (float64 or int64) and the number of clipped entries.
    """
    x = np.asarray(vector, dtype=np.float64)
    if params.scheme == "ckks":
        clipped = int(np.count_nonzero(np.abs(x) > params.clip))
        out = np.empty(x.shape[0] + 1, dtype=np.float64)
        np.clip(x, -params.clip, params.clip, out=out[:-1])
        out[:-1] *= weight
        out[-1] = weight
        return out, clipped
    stream = KeyStream.fresh()  # stochastic rounding needs fresh CSPRNG bits
    data_enc, weight_enc = params.data_encoder(), params.weight_encoder()
    enc = data_enc.encode(x, weight, stream)
    w_ring = weight_enc.encode(np.array([weight], dtype=np.float64), 1.0, stream).values
    ints = np.empty(x.shape[0] + 1, dtype=np.int64)
    ints[:-1] = data_enc.to_signed(enc.values)
    ints[-1] = weight_enc.to_signed(w_ring)[0]
    return ints, enc.clipped


def decode_slots(params: HEParams, slots: np.ndarray) -> tuple[np.ndarray, float]:
    """Map decrypted sum slots back to ``(sum w_i clip(x_i), sum w_i)`` in float64."""
    if params.scheme == "ckks":
        s = np.asarray(slots, dtype=np.float64)
        return s[:-1].copy(), float(s[-1])
    ints = np.asarray(slots, dtype=np.int64)
    data_enc, weight_enc = params.data_encoder(), params.weight_encoder()
    total = data_enc.decode_sum(data_enc.encode_integers(ints[:-1]))
    weight = float(weight_enc.decode_sum(weight_enc.encode_integers(ints[-1:]))[0])
    return total, weight


def encrypt_slots(ctx: ts.Context, params: HEParams, slots: np.ndarray) -> list[bytes]:
    """Encrypt ``slots`` chunk by chunk (each exactly fits one ciphertext); serialize without context."""
    out: list[bytes] = []
    step = params.slots
    for start in range(0, slots.shape[0], step):
        chunk = slots[start : start + step].tolist()
        if params.scheme == "ckks":
            vec: HEVector = ts.ckks_vector(ctx, chunk, scale=params.scale)
        else:
            vec = ts.bfv_vector(ctx, chunk)
        out.append(vec.serialize())
    return out


def load_chunk(ctx: ts.Context, params: HEParams, blob: bytes, length: int) -> HEVector:
    """Parse one ciphertext chunk strictly against ``ctx`` (see the module docstring).

    Raises:
        DecodeError: oversized or unparsable bytes.
        ParameterMismatchError: valid bytes for other parameters, scale or length.
    """
    if not isinstance(blob, bytes):
        raise DecodeError(f"ciphertext must be bytes, got {type(blob).__name__}")
    if len(blob) > params.max_chunk_bytes:
        raise DecodeError(f"ciphertext of {len(blob)} bytes exceeds the limit of {params.max_chunk_bytes}")
    try:
        if params.scheme == "ckks":
            vec: HEVector = ts.ckks_vector_from(ctx, blob)
        else:
            vec = ts.bfv_vector_from(ctx, blob)
    except (ValueError, RuntimeError, TypeError) as err:
        msg = str(err)
        if "invalid" in msg:
            raise ParameterMismatchError(f"ciphertext does not match the parameters of this run ({msg})") from err
        raise DecodeError(f"unparsable {params.scheme.upper()} ciphertext: {msg}") from err
    if vec.size() != length:
        raise ParameterMismatchError(f"ciphertext holds {vec.size()} values, expected {length}")
    cts = vec.data.ciphertext()
    if len(cts) != 1:
        raise ParameterMismatchError(f"chunk holds {len(cts)} ciphertexts, expected exactly one")
    ct = cts[0]
    if ct.size() != 2:
        raise ParameterMismatchError(f"ciphertext has {ct.size()} polynomials; fresh or summed ones have 2")
    if tuple(ct.parms_id()) != params.parms_id:
        raise ParameterMismatchError("ciphertext is not at the data level of this run's parameters")
    if ct.is_ntt_form() != (params.scheme == "ckks"):
        raise ParameterMismatchError("ciphertext has the wrong polynomial representation (NTT form)")
    if params.scheme == "ckks" and ct.scale != params.scale:
        raise ParameterMismatchError(f"CKKS scale {ct.scale!r} differs from this run's 2^{params.scale_bits}")
    return vec


def load_chunks(ctx: ts.Context, params: HEParams, blobs: Sequence[bytes], length: int) -> list[HEVector]:
    """Load every chunk of one ``length``-slot vector, all checks first (nothing is added here)."""
    lengths = params.chunk_lengths(length)
    if len(blobs) != len(lengths):
        raise ParameterMismatchError(f"{len(blobs)} ciphertext chunks, expected {len(lengths)}")
    return [load_chunk(ctx, params, b, n) for b, n in zip(blobs, lengths, strict=True)]


class CiphertextSum:
    """The running homomorphic sum of validated uploads (what the server computes).

    Holds no key: it is built on the server's public context. Uploads are
    loaded in full before the first addition, so a bad chunk leaves the sum
    untouched.
    """

    def __init__(self, ctx: ts.Context, params: HEParams, length: int) -> None:
        self._ctx = ctx
        self._params = params
        self._length = length
        self._acc: list[HEVector] | None = None
        self.count = 0

    def add(self, blobs: Sequence[bytes]) -> None:
        """Validate and add one upload's chunks.

        Raises:
            DecodeError, ParameterMismatchError: nothing was added.
        """
        vecs = load_chunks(self._ctx, self._params, blobs, self._length)
        if self._acc is None:
            self._acc = vecs
        else:
            for acc, v in zip(self._acc, vecs, strict=True):
                acc.add_(v)
        self.count += 1

    def serialize(self) -> list[bytes]:
        if self._acc is None:
            raise ValueError("empty sum")
        return [v.serialize() for v in self._acc]


def decrypt_chunks(vectors: Sequence[HEVector], params: HEParams) -> np.ndarray:
    """Decrypt chunk vectors bound to a secret-key context and concatenate their slots."""
    dtype = np.float64 if params.scheme == "ckks" else np.int64
    parts = [np.asarray(v.decrypt(), dtype=dtype) for v in vectors]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
