"""Multi-process encryption gives the same plaintexts as the single-process path."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.protocols.he.codec import decrypt_chunks, encrypt_slots, load_chunks
from securefed.protocols.he.keys import generate_key, load_secret_context
from securefed.protocols.he.parallel import encrypt_in_parallel, split_chunks
from securefed.protocols.he.params import select_bfv, select_ckks


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10_000), parts=st.integers(1, 64))
def test_split_chunks_partitions_evenly(n: int, parts: int) -> None:
    ranges = split_chunks(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(ranges) == min(parts, n)


def test_parallel_encryption_decrypts_to_the_same_values() -> None:
    for params in (
        select_ckks(max_clients=4, clip=1.0, max_weight=1.0, precision=1e-6, symmetric=True),
        select_bfv(max_clients=4, clip=1.0, max_weight=1.0, precision=1e-6, symmetric=False),
    ):
        mode = "client-held" if params.symmetric else "key-authority"
        km = generate_key(params, mode)
        secret = load_secret_context(km.secret_context, params)
        enc_bytes = km.secret_context if params.symmetric else km.public_context
        enc_ctx = secret if params.symmetric else load_secret_context(km.secret_context, params)
        length = params.slots * 5 + 3
        rng = np.random.default_rng(0)
        vals = rng.uniform(-1, 1, length) if params.scheme == "ckks" else rng.integers(-99, 99, length)
        par = encrypt_in_parallel(enc_ctx, enc_bytes, params, vals, workers=3, threshold=1)
        ser = encrypt_slots(enc_ctx, params, vals)
        assert len(par) == len(ser) == 6 and par != ser  # fresh randomness per encryption
        out = decrypt_chunks(load_chunks(secret, params, par, length), params)
        if params.scheme == "ckks":
            assert np.max(np.abs(out - vals)) <= params.error_bound(1)
        else:
            assert np.array_equal(out, vals)
