"""HE wire format, ciphertext loading and key handling: round trips and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.protocols.errors import DecodeError, IntegrityError
from securefed.protocols.he import messages as m
from securefed.protocols.he.codec import (
    CiphertextSum,
    decrypt_chunks,
    encrypt_slots,
    load_chunk,
    load_chunks,
)
from securefed.protocols.he.errors import ParameterMismatchError, SecretKeyExposureError
from securefed.protocols.he.keys import (
    generate_key,
    key_id_of,
    load_secret_context,
    load_server_context,
    open_secret_context,
    params_context_bytes,
    seal_secret_context,
)
from securefed.protocols.he.params import HEParams, select_bfv, select_ckks
from securefed.protocols.primitives import kex

CKKS = select_ckks(max_clients=8, clip=1.0, max_weight=1.0, precision=1e-6, symmetric=True)
CKKS_ASYM = select_ckks(max_clients=8, clip=1.0, max_weight=1.0, precision=1e-6, symmetric=False)
BFV = select_bfv(max_clients=8, clip=1.0, max_weight=1.0, precision=1e-6, symmetric=True)
DIM = 5000
LIM = m.Limits(CKKS.fingerprint, DIM, 8, CKKS.n_chunks(DIM + 1), CKKS.max_chunk_bytes)

kid = st.binary(min_size=16, max_size=16)
pk = st.binary(min_size=32, max_size=32)
rnd = st.integers(0, 2**63)
ids = st.lists(st.integers(0, 2**40), max_size=8, unique=True).map(tuple)
chunks = st.lists(st.binary(max_size=64), min_size=LIM.n_chunks, max_size=LIM.n_chunks).map(tuple)
fp = st.just(CKKS.fingerprint)

MESSAGES = st.one_of(
    st.builds(m.Offer, rnd, fp, st.integers(0, 2**40), st.one_of(st.just(b""), kid)),
    st.builds(m.Advertise, rnd, fp, pk, st.one_of(st.just(b""), kid)),
    st.builds(m.KeyRequest, rnd, fp, st.one_of(st.just(b""), kid),
              st.lists(st.tuples(st.integers(0, 2**40), pk), max_size=8, unique_by=lambda x: x[0]).map(tuple)),
    st.builds(m.KeyBundle, rnd, fp, kid,
              st.lists(st.tuples(st.integers(0, 2**40), st.binary(max_size=100)), max_size=8,
                       unique_by=lambda x: x[0]).map(tuple)),
    st.builds(m.Go, rnd, fp, st.integers(0, 2**40), kid, st.integers(-1, 2**40), st.one_of(st.just(b""), pk),
              st.binary(max_size=100), st.binary(max_size=100)),
    st.builds(m.Upload, rnd, fp, kid, chunks),
    st.builds(m.Aggregate, rnd, fp, kid, ids, chunks),
    st.builds(m.ContextRequest, rnd, fp, st.booleans()),
    st.builds(m.Context, rnd, fp, kid, st.binary(max_size=100)),
)


@settings(max_examples=150, deadline=None)
@given(MESSAGES)
def test_messages_round_trip(msg: m.HEMessage) -> None:
    assert type(msg).decode(msg.encode(), LIM) == msg


@settings(max_examples=20, deadline=None)
@given(rnd, kid, ids, st.floats(-1e6, 1e6))
def test_release_round_trip(r: int, k: bytes, who: tuple[int, ...], w: float) -> None:
    total = np.random.default_rng(r % 1000).normal(size=DIM)
    msg = m.Release(r, CKKS.fingerprint, k, who, total, w)
    out = m.Release.decode(msg.encode(), LIM)
    assert np.array_equal(out.total, total) and (out.key_id, out.contributors, out.total_weight) == (k, who, w)


@settings(max_examples=60, deadline=None)
@given(MESSAGES, st.data())
def test_truncated_or_extended_messages_are_rejected(msg: m.HEMessage, data: st.DataObject) -> None:
    raw = msg.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DecodeError):
        type(msg).decode(raw[:cut], LIM)
    with pytest.raises(DecodeError):
        type(msg).decode(raw + b"\0", LIM)


def test_other_fingerprint_kind_and_size_are_rejected() -> None:
    up = m.Upload(1, BFV.fingerprint, bytes(16), tuple(b"x" for _ in range(LIM.n_chunks)))
    with pytest.raises(ParameterMismatchError, match="fingerprint"):
        m.Upload.decode(up.encode(), LIM)
    ok = m.Upload(1, CKKS.fingerprint, bytes(16), tuple(b"x" for _ in range(LIM.n_chunks)))
    with pytest.raises(DecodeError, match="kind"):
        m.Aggregate.decode(ok.encode(), LIM)
    few = m.Upload(1, CKKS.fingerprint, bytes(16), (b"x",))
    with pytest.raises(ParameterMismatchError, match="chunks"):
        m.Upload.decode(few.encode(), LIM)
    big = m.Upload(1, CKKS.fingerprint, bytes(16), tuple(bytes(LIM.max_chunk_bytes + 1) for _ in range(LIM.n_chunks)))
    with pytest.raises(DecodeError, match="exceeds"):
        m.Upload.decode(big.encode(), LIM)
    short_key = m.Upload(1, CKKS.fingerprint, bytes(8), tuple(b"x" for _ in range(LIM.n_chunks)))
    with pytest.raises(DecodeError, match="key id"):
        m.Upload.decode(short_key.encode(), LIM)
    dup = m.Aggregate(1, CKKS.fingerprint, bytes(16), (3, 3), tuple(b"x" for _ in range(LIM.n_chunks)))
    with pytest.raises(DecodeError, match="duplicates"):
        m.Aggregate.decode(dup.encode(), LIM)
    many = m.Aggregate(1, CKKS.fingerprint, bytes(16), tuple(range(9)), tuple(b"x" for _ in range(LIM.n_chunks)))
    with pytest.raises(DecodeError, match="exceed"):
        m.Aggregate.decode(many.encode(), LIM)


def _server_ctx(p: HEParams) -> ts.Context:
    return load_server_context(params_context_bytes(p), p, need_public_key=False)


@pytest.mark.parametrize("p", [CKKS, BFV], ids=["ckks", "bfv"])
def test_chunks_round_trip_and_sum(p: HEParams) -> None:
    km = generate_key(p, "client-held")
    ctx = load_secret_context(km.secret_context, p)
    rng = np.random.default_rng(1)
    length = p.slots * 2 + 17  # two full chunks and a short one
    if p.scheme == "ckks":
        vals = [rng.uniform(-1, 1, length) for _ in range(3)]
    else:
        vals = [rng.integers(-1000, 1000, length) for _ in range(3)]
    total = CiphertextSum(_server_ctx(p), p, length)
    for v in vals:
        blobs = encrypt_slots(ctx, p, v)
        assert len(blobs) == 3 and all(len(b) <= p.max_chunk_bytes for b in blobs)
        total.add(blobs)
    out = decrypt_chunks(load_chunks(ctx, p, total.serialize(), length), p)
    if p.scheme == "ckks":
        assert np.max(np.abs(out - sum(vals))) <= p.error_bound(3)
    else:
        assert np.array_equal(out, sum(vals))


def test_bad_chunks_are_rejected_before_adding() -> None:
    p = CKKS
    km = generate_key(p, "client-held")
    ctx = load_secret_context(km.secret_context, p)
    server = _server_ctx(p)
    good = encrypt_slots(ctx, p, np.full(p.slots, 0.5))
    total = CiphertextSum(server, p, p.slots)
    total.add(good)
    blob = good[0]
    with pytest.raises(DecodeError):
        load_chunk(server, p, blob[:-40], p.slots)
    with pytest.raises(DecodeError, match="exceeds"):
        load_chunk(server, p, blob + bytes(p.max_chunk_bytes), p.slots)
    with pytest.raises(DecodeError):
        load_chunk(server, p, b"", p.slots)
    with pytest.raises(ParameterMismatchError, match="holds"):
        load_chunk(server, p, blob, p.slots - 1)
    # Same key and parameters, another scale.
    with pytest.raises(ParameterMismatchError, match="scale"):
        load_chunk(server, p, ts.ckks_vector(ctx, [0.1] * p.slots, scale=2.0**30).serialize(), p.slots)
    # NVFlare-style parameters ([60, 40, 40]: too large for one data prime) and a smaller ring.
    for n, bits, err in ((8192, [60, 40, 40], DecodeError), (4096, [60, 40], ParameterMismatchError)):
        other = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=bits, n_threads=1)
        vec = ts.ckks_vector(other, [0.1] * (n // 2), scale=p.scale)
        with pytest.raises(err):
            load_chunk(server, p, vec.serialize(), n // 2)
    # A BFV ciphertext offered as CKKS.
    bctx = BFV.new_context()
    with pytest.raises(DecodeError):
        load_chunk(server, p, ts.bfv_vector(bctx, [1] * 10).serialize(), 10)
    # A multiplied (three-polynomial) ciphertext.
    actx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40], n_threads=1)
    actx.auto_relin = False
    actx.auto_rescale = False
    sq = ts.ckks_vector(actx, [0.1] * p.slots, scale=2.0**20)
    sq = sq * sq
    with pytest.raises(DecodeError):
        load_chunk(server, p, sq.serialize(), p.slots)
    # One bad chunk in an upload: nothing of it is added.
    with pytest.raises(DecodeError):
        total.add([blob[:-40]])
    out = decrypt_chunks(load_chunks(ctx, p, total.serialize(), p.slots), p)
    assert np.max(np.abs(out - 0.5)) <= p.error_bound(1) and total.count == 1


def test_server_context_is_public_and_cannot_decrypt() -> None:
    for p, mode in ((CKKS, "client-held"), (CKKS_ASYM, "key-authority")):
        km = generate_key(p, mode)
        server = load_server_context(km.public_context, p, need_public_key=mode == "key-authority")
        assert not server.is_private() and server.is_public()
        with pytest.raises(ValueError):
            server.secret_key()
        ctx = load_secret_context(km.secret_context, p)
        vec = ts.ckks_vector_from(server, encrypt_slots(ctx, p, np.ones(10))[0])
        with pytest.raises(ValueError, match="secret"):
            vec.decrypt()
        with pytest.raises(SecretKeyExposureError):
            load_server_context(km.secret_context, p, need_public_key=False)
    assert key_id_of(km.public_context) == km.key_id


def test_contexts_for_other_parameters_or_garbage_are_rejected() -> None:
    km = generate_key(BFV, "client-held")
    with pytest.raises(ParameterMismatchError):
        load_secret_context(km.secret_context, CKKS)
    with pytest.raises(DecodeError):
        load_server_context(b"\x00" * 64, CKKS, need_public_key=False)
    with pytest.raises(ParameterMismatchError, match="public key"):
        load_server_context(params_context_bytes(CKKS), CKKS, need_public_key=True)
    with pytest.raises(ParameterMismatchError, match="no secret key"):
        load_secret_context(params_context_bytes(CKKS), CKKS)


def test_secret_context_envelope() -> None:
    km = generate_key(CKKS, "client-held")
    sk_h, pk_h = kex.generate_keypair()
    sk_r, pk_r = kex.generate_keypair()
    env = seal_secret_context(sk_h, pk_r, 5, 1, 2, km.key_id, km.secret_context)
    assert km.secret_context not in env
    blob, ctx = open_secret_context(sk_r, pk_h, 5, 1, 2, km.key_id, env, CKKS)
    assert blob == km.secret_context and ctx.is_private()
    bad_cases = [
        (sk_r, pk_h, 6, 1, 2, km.key_id, env),  # replayed in another round
        (sk_r, pk_h, 5, 1, 3, km.key_id, env),  # redirected to another recipient
        (sk_r, pk_h, 5, 1, 2, bytes(16), env),  # announced under another key id
        (sk_r, pk_h, 5, 1, 2, km.key_id, env[:-1] + bytes([env[-1] ^ 1])),  # tampered
        (kex.generate_keypair()[0], pk_h, 5, 1, 2, km.key_id, env),  # not the recipient
    ]
    for case in bad_cases:
        with pytest.raises(IntegrityError):
            open_secret_context(*case, CKKS)
    # A holder that seals some other key under the announced id is caught by the digest.
    other = generate_key(CKKS, "client-held")
    env2 = seal_secret_context(sk_h, pk_r, 5, 1, 2, km.key_id, other.secret_context)
    with pytest.raises(IntegrityError, match="not the key"):
        open_secret_context(sk_r, pk_h, 5, 1, 2, km.key_id, env2, CKKS)
