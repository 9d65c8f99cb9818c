"""Encrypting a large update in several processes.

TenSEAL's ``n_threads`` gives no parallelism to vector encryption (measured at
exactly one core, performance-limits.md §2.4), but separate processes each
encrypting a contiguous range of chunks scale (1.95x on 2 cores, same
reference). The calling process encrypts one share itself; ``workers - 1``
pool processes encrypt the rest from the serialized context.

The pool uses the ``spawn`` start method: forking a process that holds
TenSEAL (and possibly torch) thread pools is unsafe. Workers start once per
process and cache each loaded context by its digest, so a client pays for
parsing its key once, not every round. The context bytes cross a process
boundary inside the same client (the same trust domain), never the network.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import tenseal as ts

from .codec import encrypt_slots
from .params import HEParams

#: Below this many slots a single process is faster than shipping work to a pool.
DEFAULT_THRESHOLD = 1 << 18

_POOLS: dict[int, ProcessPoolExecutor] = {}
_WORKER_CONTEXTS: dict[bytes, ts.Context] = {}


def default_workers() -> int:
    """One process per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _pool(n: int) -> ProcessPoolExecutor:
    pool = _POOLS.get(n)
    if pool is None:
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        _POOLS[n] = pool
    return pool


@atexit.register
def shutdown_pools() -> None:
    """Stop the worker processes (also run at interpreter exit)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def _worker_encrypt(context_bytes: bytes, params: HEParams, slots: np.ndarray) -> list[bytes]:
    digest = hashlib.sha256(context_bytes).digest()
    ctx = _WORKER_CONTEXTS.get(digest)
    if ctx is None:
        if len(_WORKER_CONTEXTS) >= 4:
            _WORKER_CONTEXTS.clear()
        ctx = ts.context_from(context_bytes, n_threads=1)
        if params.scheme == "ckks":
            ctx.global_scale = params.scale
        _WORKER_CONTEXTS[digest] = ctx
    return encrypt_slots(ctx, params, slots)


def split_chunks(n_chunks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal ranges ``[lo, hi)`` of chunk indices (empty ranges dropped)."""
    parts = max(1, min(parts, n_chunks))
    base, extra = divmod(n_chunks, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        if hi > lo:
            out.append((lo, hi))
        lo = hi
    return out


def encrypt_in_parallel(
    ctx: ts.Context, context_bytes: bytes, params: HEParams, slots: np.ndarray, *,
    workers: int, threshold: int = DEFAULT_THRESHOLD,
) -> list[bytes]:
    """Encrypt ``slots`` chunk by chunk, in ``workers`` processes when the vector is large.

    The output is the same list of chunk ciphertexts :func:`.codec.encrypt_slots`
    produces (fresh randomness, so not byte-identical).
    """
    n_chunks = params.n_chunks(slots.shape[0])
    if workers <= 1 or slots.shape[0] < threshold or n_chunks < 2:
        return encrypt_slots(ctx, params, slots)
    ranges = split_chunks(n_chunks, workers)
    step = params.slots
    pool = _pool(len(ranges) - 1)
    futures: list[Future[list[bytes]]] = [
        pool.submit(_worker_encrypt, context_bytes, params, slots[lo * step : hi * step]) for lo, hi in ranges[1:]
    ]
    lo, hi = ranges[0]
    out = encrypt_slots(ctx, params, slots[lo * step : hi * step])
    for fut in futures:
        out.extend(fut.result())
    return out
