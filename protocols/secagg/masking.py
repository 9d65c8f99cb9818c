"""Mask expansion: the hot path of SecAgg on both client and server.

A mask is the keystream of AES-256-CTR keyed by a full 256-bit seed (see
:func:`securefed.protocols.csprng.ctr_encryptor`), read as little-endian
uint32 words (``b <= 32``) or uint64 words (``32 < b <= 64``) and reduced mod
``2^b``. Because ``2^b`` divides the word range, every word is exactly uniform
on ``Z_{2^b}``: no rejection sampling and no bias (contrast Flower's
``randint(0, m - 1)``, peers.md §2.1). Entry ``i`` of the mask of ``seed`` is
word ``i`` of its stream, which is exactly
``KeyStream(seed).uniform_uint(L, b)``.

The client computes ``y = encode(x) + PRG(b_u) + sum_v s(u,v) PRG(s_uv)``
(Bonawitz et al., CCS 2017, §4) and the server removes the self masks of
survivors and the pairwise masks towards dropped clients. Both do it here,
**one cache-sized chunk at a time**: for each chunk, quantize the input into
the output buffer, then for each stream write the keystream straight into a
reused scratch buffer with ``update_into`` and add it in place. The output
chunk never leaves L2 while its streams are applied, which measured faster
than expanding each whole mask and adding it (performance-limits.md §2.1,
§2.2; ``benchmarks/secagg.py`` measures both). uint32 addition wraps mod
``2^32`` for free; for ``b < 32`` the result is masked once at the end.

Streams are position-addressable, so a vector can be split into contiguous
ranges processed by several threads (``cryptography`` and NumPy release the
GIL); the result is bit-identical for any thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..csprng import SEED_BYTES, byte_view, ctr_encryptor
from ..encoding import ChunkQuantizer, FixedPointEncoder

#: Entries per chunk: scratch and output chunk stay in a 1 MiB L2.
CHUNK = 32768

_POOLS: dict[int, ThreadPoolExecutor] = {}


@dataclass(frozen=True)
class MaskStream:
    """One mask to apply: ``+PRG(seed)`` or, if ``negate``, ``-PRG(seed)``."""

    seed: bytes
    negate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes")


def ring_dtype(modulus_bits: int) -> type[np.unsignedinteger]:
    if not 1 <= modulus_bits <= 64:
        raise ValueError("modulus_bits must be in 1..64")
    return np.uint32 if modulus_bits <= 32 else np.uint64


def expand_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """The mask of ``seed`` on its own (tests, vectors, the attack layer)."""
    out = np.zeros(length, dtype=ring_dtype(modulus_bits))
    apply_masks(out, [MaskStream(seed)], modulus_bits=modulus_bits)
    return out


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="securefed-mask")
    return pool


def _ranges(length: int, threads: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` at chunk boundaries (multiples of 16 bytes for every dtype)."""
    chunks = -(-length // CHUNK)
    parts = max(1, min(threads, chunks))
    per = -(-chunks // parts)
    out = []
    for p in range(parts):
        lo, hi = p * per * CHUNK, min(length, (p + 1) * per * CHUNK)
        if lo < hi:
            out.append((lo, hi))
    return out


def _run(length: int, threads: int, work: Callable[[int, int], None]) -> None:
    ranges = _ranges(length, threads)
    if len(ranges) <= 1:
        for lo, hi in ranges:
            work(lo, hi)
        return
    for f in [_pool(threads).submit(work, lo, hi) for lo, hi in ranges]:
        f.result()


def _apply_range(
    acc: np.ndarray,
    streams: Sequence[MaskStream],
    lo: int,
    hi: int,
    before: Callable[[int, int], None] | None = None,
) -> None:
    """``acc[lo:hi] += sum(+-PRG)``; ``before(a, b)`` fills ``acc[a:b]`` first (fused encoding)."""
    item = acc.dtype.itemsize
    ciphers = [(ctr_encryptor(s.seed, lo * item), s.negate) for s in streams]
    scratch = np.empty(min(CHUNK, hi - lo), dtype=acc.dtype)
    raw = byte_view(scratch)
    zeros = bytes(len(raw))
    for a in range(lo, hi, CHUNK):
        b = min(hi, a + CHUNK)
        n = b - a
        if before is not None:
            before(a, b)
        out = acc[a:b]
        buf = scratch[:n]
        nb = n * item
        z = zeros[:nb]
        dst = raw[:nb]
        for enc, negate in ciphers:
            enc.update_into(z, dst)
            if negate:
                np.subtract(out, buf, out=out)
            else:
                np.add(out, buf, out=out)


def _reduce(acc: np.ndarray, modulus_bits: int) -> None:
    if modulus_bits not in (32, 64):
        acc &= acc.dtype.type((1 << modulus_bits) - 1)


def apply_masks(
    acc: np.ndarray, streams: Sequence[MaskStream], *, modulus_bits: int, threads: int = 1
) -> None:
    """In place: ``acc += sum_s (+-PRG(s.seed)) mod 2^modulus_bits``.

    ``acc`` must be a contiguous uint32 (``b <= 32``) or uint64 array holding
    ring elements.
    """
    if acc.dtype != ring_dtype(modulus_bits) or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError(f"acc must be a contiguous 1-D {np.dtype(ring_dtype(modulus_bits)).name} array")
    if streams:
        _run(acc.shape[0], threads, lambda lo, hi: _apply_range(acc, streams, lo, hi))
    _reduce(acc, modulus_bits)


def encode_and_mask(
    x: np.ndarray,
    tail: np.ndarray,
    *,
    encoder: FixedPointEncoder,
    weight: float,
    rounding_seed: bytes,
    streams: Sequence[MaskStream],
    threads: int = 1,
    clipped: int | None = None,
) -> tuple[np.ndarray, int]:
    """The client's masked upload ``encode(w * clip(x)) || tail  +  sum(+-PRG)``.

    Args:
        x: the float update (``d`` entries).
        tail: signed integers appended after the encoded entries (the weight
            and clipped-count entries of :mod:`.client`), already in range.
        encoder: the fixed-point encoder (clip, scale, ring).
        weight: the client weight the update is scaled by.
        rounding_seed: 32 bytes seeding the stochastic-rounding stream (entry
            ``i`` uses uint32 word ``i``, as :meth:`FixedPointEncoder.encode_fast`).
        streams: the self mask and the signed pairwise masks.
        threads: worker threads; the output does not depend on it.
        clipped: the caller's :meth:`ChunkQuantizer.count_clipped` of ``x``, if
            it already has it (saves two passes).

    Returns:
        The masked ring vector (length ``d + len(tail)``) and the number of
        clipped entries of ``x``.

    Raises:
        ValueError: ``x`` contains NaN or Inf.
    """
    d = x.shape[0]
    length = d + tail.shape[0]
    out = np.empty(length, dtype=encoder.dtype)
    signed = out.view(np.int32 if encoder.dtype == np.uint32 else np.int64)
    if clipped is None:
        clipped = ChunkQuantizer(encoder, weight, 1).count_clipped(x)
    need_clip = clipped > 0

    def work(lo: int, hi: int) -> None:
        q = ChunkQuantizer(encoder, weight, CHUNK)
        rnd_cipher = ctr_encryptor(rounding_seed, 4 * lo) if lo < d else None
        rand = np.empty(CHUNK, dtype=np.uint32)
        rand_raw = byte_view(rand)
        zeros = bytes(4 * CHUNK)

        def fill(a: int, b: int) -> None:
            xa, xb = a, min(b, d)
            if xa < xb and rnd_cipher is not None:
                n = xb - xa
                rnd_cipher.update_into(zeros[: 4 * n], rand_raw[: 4 * n])
                q.quantize_into(x[xa:xb], rand[:n], signed[xa:xb], clip=need_clip)
            if b > d:
                ta = max(a, d)
                signed[ta:b] = tail[ta - d : b - d]

        _apply_range(out, streams, lo, hi, before=fill)

    _run(length, threads, work)
    _reduce(out, encoder.modulus_bits)
    return out, clipped


def sum_into(acc: np.ndarray, vectors: Sequence[np.ndarray], *, modulus_bits: int, threads: int = 1) -> None:
    """In place: ``acc += sum(vectors) mod 2^modulus_bits``, chunk by chunk."""

    def work(lo: int, hi: int) -> None:
        for a in range(lo, hi, CHUNK):
            b = min(hi, a + CHUNK)
            out = acc[a:b]
            for v in vectors:
                np.add(out, v[a:b], out=out)

    if vectors:
        _run(acc.shape[0], threads, work)
    _reduce(acc, modulus_bits)
