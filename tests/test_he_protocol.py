"""Full HE aggregation rounds: sums against the plaintext oracle, key secrecy, roles, bad peers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, AUTHORITY, SERVER, ClientInput, Message
from securefed.protocols.errors import ConfigurationError, DecodeError, RoundAbortedError
from securefed.protocols.he import BFVAggregator, CKKSAggregator, HEAggregator
from securefed.protocols.he import messages as m
from securefed.protocols.he.errors import (
    BelowMinClientsError,
    ParameterMismatchError,
    SecretKeyExposureError,
)
from securefed.protocols.he.keys import generate_key, key_id_of, load_server_context

MODES = ("client-held", "key-authority")


def _inputs(rng: np.random.Generator, ids: list[int], d: int, scale: float = 0.1,
            weights: bool = True) -> dict[int, ClientInput]:
    return {
        c: ClientInput(rng.normal(0, scale, d).astype(np.float32), float(rng.uniform(0.2, 1.0)) if weights else 1.0)
        for c in ids
    }


def _plain_sum(inputs: Mapping[int, ClientInput], ids: tuple[int, ...], clip: float) -> tuple[np.ndarray, float]:
    total = sum(inputs[c].weight * np.clip(inputs[c].vector.astype(np.float64), -clip, clip) for c in ids)
    return np.asarray(total), float(sum(inputs[c].weight for c in ids))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(1, 9000), mode=st.sampled_from(MODES), seed=st.integers(0, 2**32 - 1))
def test_ckks_sum_within_the_parameter_bound(n: int, d: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    agg = CKKSAggregator(key_mode=mode, max_clients=8, clip=0.5, min_clients=2)
    inputs = _inputs(rng, list(rng.choice(50, n, replace=False)), d, scale=0.3)
    res = run_round(agg.new_round(0, inputs), agg.stages).result
    want, w = _plain_sum(inputs, tuple(sorted(inputs)), 0.5)
    bound = agg.params.error_bound(n)
    assert res.contributors == tuple(sorted(inputs))
    assert np.max(np.abs(res.total - want)) <= bound and abs(res.total_weight - w) <= bound
    assert res.measurements["precision_bound"] == bound
    assert res.measurements["max_abs_error"] <= bound
    assert res.measurements["clipped_entries"] == sum(int((np.abs(i.vector) > 0.5).sum()) for i in inputs.values())


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(1, 20000), mode=st.sampled_from(MODES), seed=st.integers(0, 2**32 - 1))
def test_bfv_sum_is_exact(n: int, d: int, mode: str, seed: int) -> None:
    """The decrypted BFV sum equals the integer sum of what the clients encrypted, bit for bit."""
    import securefed.protocols.he.client as client_mod

    encoded: list[np.ndarray] = []
    real = client_mod.plaintext_slots

    def record(params, vector, weight):  # type: ignore[no-untyped-def]
        ints, clipped = real(params, vector, weight)
        encoded.append(ints.copy())
        return ints, clipped

    rng = np.random.default_rng(seed)
    agg = BFVAggregator(key_mode=mode, max_clients=8, min_clients=2, clip=0.5, max_weight=2.0)
    inputs = _inputs(rng, list(rng.choice(50, n, replace=False)), d, scale=0.4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_mod, "plaintext_slots", record)
        res = run_round(agg.new_round(3, inputs), agg.stages).result
    f = agg.params.scale_bits
    want = np.sum(encoded, axis=0)
    assert len(encoded) == n
    assert np.array_equal(np.rint(res.total * 2.0**f).astype(np.int64), want[:-1])
    assert np.array_equal(res.total * 2.0**f, want[:-1].astype(np.float64))
    assert res.total_weight * 2.0**f == float(want[-1])
    plain, w = _plain_sum(inputs, tuple(sorted(inputs)), 0.5)
    assert max(float(np.max(np.abs(res.total - plain))), abs(res.total_weight - w)) <= agg.params.error_bound(n)


@pytest.mark.parametrize("mode", MODES)
def test_bfv_off_grid_sum_within_quantization_bound(mode: str) -> None:
    rng = np.random.default_rng(5)
    agg = BFVAggregator(key_mode=mode, max_clients=10, min_clients=2, clip=0.2)
    inputs = _inputs(rng, list(range(10)), 3000, scale=0.15)
    res = run_round(agg.new_round(0, inputs), agg.stages).result
    want, w = _plain_sum(inputs, tuple(range(10)), 0.2)
    err = max(float(np.max(np.abs(res.total - want))), abs(res.total_weight - w))
    assert 0 < err <= agg.params.error_bound(10)


def _secret_key_bytes(agg: HEAggregator) -> list[bytes]:
    """The SEAL serialization of every secret key in the run (from clients and the authority)."""
    stores = list(agg._state.clients.values()) + [agg._state.authority]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, store in enumerate(s for s in stores if s.key_id is not None):
            path = os.path.join(tmp, str(i))
            ctx = store.context()
            if ctx.is_private():
                ctx.secret_key().data.save(path)
                with open(path, "rb") as fh:
                    out.append(fh.read())
                assert out[-1] in store.context_bytes  # positive control: the search finds a key where it is
    return out


def _recording(rnd: object) -> list[Message]:
    """Wrap the server's ``receive`` to record every message delivered to it."""
    seen: list[Message] = []
    server = rnd.server  # type: ignore[attr-defined]
    inner = server.receive

    def receive(msg: Message) -> list[Message]:
        seen.append(msg)
        return inner(msg)

    server.receive = receive
    return seen


@pytest.mark.parametrize("name", ["ckks", "bfv"])
@pytest.mark.parametrize("mode", MODES)
def test_no_secret_key_reaches_the_server(name: str, mode: str) -> None:
    rng = np.random.default_rng(11)
    agg = AGGREGATORS.create(name, key_mode=mode, max_clients=6, min_clients=2, rotate_every=2)
    assert isinstance(agg, HEAggregator)
    seen: list[Message] = []
    keys: set[bytes] = set()
    for r, ids in enumerate([[0, 1, 2], [1, 2, 3, 4], [0, 4, 5]]):  # late joiners, then a rotation
        rnd = agg.new_round(r, _inputs(rng, ids, 700))
        seen_round = _recording(rnd)
        out = run_round(rnd, agg.stages)
        assert list(out.observation.transcript) == seen_round
        seen += seen_round
        keys |= set(_secret_key_bytes(agg))
    assert len(keys) == 2  # one rotation: two distinct secret keys over the run
    lim = agg.settings.limits(700)
    kinds = {"setup": (m.Advertise, m.Context), "keys": (m.KeyBundle,), "upload": (m.Upload,), "decrypt": (m.Release,)}
    for msg in seen:
        assert msg.recipient == SERVER
        for key in keys:
            assert key not in msg.payload
            for start in range(0, len(key) - 64, len(key) // 16):  # no 64-byte window of any key either
                assert key[start : start + 64] not in msg.payload
        decoded = None
        for cls in kinds[msg.stage]:
            try:
                decoded = cls.decode(msg.payload, lim)
            except DecodeError:
                continue
        assert decoded is not None
        if isinstance(decoded, m.Context):  # every context the server gets loads as public
            ctx = load_server_context(decoded.public_context, agg.params, need_public_key=True)
            assert not ctx.is_private()
    # The context the server adds under is public and cannot decrypt what it holds.
    server_ctx = agg._state.server.context
    assert server_ctx is not None and not server_ctx.is_private()
    vec = agg.params.scheme == "ckks"
    import tenseal as ts

    blob = m.Upload.decode(next(iter(out.observation.ciphertexts.values())), lim).chunks[0]
    loaded = (ts.ckks_vector_from if vec else ts.bfv_vector_from)(server_ctx, blob)
    with pytest.raises(ValueError, match="secret"):
        loaded.decrypt()


def test_server_view_holds_only_ciphertexts() -> None:
    rng = np.random.default_rng(2)
    for mode in MODES:
        agg = CKKSAggregator(key_mode=mode, max_clients=5)
        inputs = _inputs(rng, [0, 1, 2], 100)
        out = run_round(agg.new_round(0, inputs), agg.stages)
        obs = out.observation
        assert obs.protocol == "ckks" and obs.contributors == (0, 1, 2)
        assert obs.individual_updates is None and obs.masked_updates is None and obs.individual_weights is None
        assert set(obs.ciphertexts or {}) == {0, 1, 2}
        if mode == "client-held":
            assert obs.aggregate is None and obs.total_weight is None
        else:  # the authority released the sum to the server, nothing else
            assert obs.aggregate is not None and np.allclose(obs.aggregate, out.result.total)


def test_key_authority_refuses_below_min_clients() -> None:
    rng = np.random.default_rng(4)
    agg = BFVAggregator(key_mode="key-authority", max_clients=5, min_clients=3)
    inputs = _inputs(rng, [0, 1, 2], 50)
    rnd = agg.new_round(0, inputs)
    to_authority: list[Message] = []
    inner = rnd.authority.receive

    def spy(msg: Message) -> list[Message]:
        to_authority.append(msg)
        return inner(msg)

    rnd.authority.receive = spy
    run_round(rnd, agg.stages)
    # The authority got a context request and one aggregate, never an upload.
    assert [msg.stage for msg in to_authority] == ["setup", "decrypt"]
    lim = agg.settings.limits(50)
    agg_msg = m.Aggregate.decode(to_authority[1].payload, lim)
    assert agg_msg.contributors == (0, 1, 2)
    # A (dishonest) server asks it to decrypt one client's ciphertext as an "aggregate".
    rnd2 = agg.new_round(1, _inputs(rng, [0, 1, 2], 50))
    rnd2.server.start()
    single = m.Aggregate(1, agg.params.fingerprint, agg_msg.key_id, (0,), agg_msg.chunks)
    with pytest.raises(BelowMinClientsError):
        rnd2.authority.receive(Message(SERVER, AUTHORITY, "decrypt", single.encode()))
    # An upload is no message the authority decodes.
    up = m.Upload(1, agg.params.fingerprint, agg_msg.key_id, agg_msg.chunks)
    with pytest.raises(DecodeError):
        rnd2.authority.receive(Message(SERVER, AUTHORITY, "decrypt", up.encode()))
    # The honest server aborts before asking when too few uploaded.
    with pytest.raises(RoundAbortedError, match="min_clients"):
        run_round(agg.new_round(2, _inputs(rng, [0, 1, 2], 50)), agg.stages, {2: "upload"})


def test_decrypting_client_refuses_below_min_clients() -> None:
    rng = np.random.default_rng(6)
    agg = CKKSAggregator(max_clients=5, min_clients=2)
    rnd = agg.new_round(0, _inputs(rng, [0, 1], 20))
    run_round(rnd, agg.stages)
    lim = agg.settings.limits(20)
    key_id = agg._state.server.key_id
    assert key_id is not None
    blobs = m.Upload.decode(rnd.server.observation().ciphertexts[1], lim).chunks
    rnd2 = agg.new_round(1, _inputs(rng, [0, 1], 20))
    with pytest.raises(BelowMinClientsError):
        rnd2.he_clients[0].receive(
            Message(SERVER, 0, "decrypt", m.Aggregate(1, agg.params.fingerprint, key_id, (1,), blobs).encode())
        )


def test_context_with_secret_key_sent_to_server_is_refused() -> None:
    agg = CKKSAggregator(key_mode="key-authority", max_clients=5)
    rnd = agg.new_round(0, _inputs(np.random.default_rng(0), [0, 1], 10))
    rnd.server.start()
    km = generate_key(agg.params, "key-authority")
    bad = m.Context(0, agg.params.fingerprint, key_id_of(km.secret_context), km.secret_context)
    with pytest.raises(SecretKeyExposureError):
        rnd.server.receive(Message(AUTHORITY, SERVER, "setup", bad.encode()))
    assert agg._state.server.key_id is None


def test_upload_under_other_parameters_is_excluded() -> None:
    """A client whose ciphertexts were made under other parameters (N=4096) is refused, not added."""
    import tenseal as ts

    rng = np.random.default_rng(8)
    agg = BFVAggregator(max_clients=6, min_clients=2)
    other = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=agg.params.plain_modulus, coeff_mod_bit_sizes=[60, 40],
                       n_threads=1)
    inputs = _inputs(rng, [0, 1, 2], 300)
    rnd = agg.new_round(0, inputs)
    inner = rnd.he_clients[2]._reply

    def swap(stage: str, msg: m.HEMessage) -> list[Message]:
        if isinstance(msg, m.Upload):
            msg = m.Upload(msg.round_index, msg.fingerprint, msg.key_id, (ts.bfv_vector(other, [1] * 301).serialize(),))
        return inner(stage, msg)

    rnd.he_clients[2]._reply = swap
    out = run_round(rnd, agg.stages)
    assert out.result.contributors == (0, 1)
    assert out.excluded[2].startswith(ParameterMismatchError.__name__)
    want, _ = _plain_sum(inputs, (0, 1), 1.0)
    assert np.max(np.abs(out.result.total - want)) <= agg.params.error_bound(2)


def test_upload_labelled_with_another_key_id_is_refused() -> None:
    rng = np.random.default_rng(9)
    agg = CKKSAggregator(max_clients=6, min_clients=2)
    rnd = agg.new_round(0, _inputs(rng, [0, 1, 2], 40))
    inner = rnd.he_clients[2]._reply

    def relabel(stage: str, msg: m.HEMessage) -> list[Message]:
        if isinstance(msg, m.Upload):
            msg = m.Upload(msg.round_index, msg.fingerprint, bytes(16), msg.chunks)
        return inner(stage, msg)

    rnd.he_clients[2]._reply = relabel
    out = run_round(rnd, agg.stages)
    assert out.result.contributors == (0, 1)
    assert out.excluded[2].startswith(ParameterMismatchError.__name__)


def test_key_lifecycle_late_joiners_and_rotation() -> None:
    rng = np.random.default_rng(12)
    agg = CKKSAggregator(max_clients=6, rotate_every=3)
    st_ = agg._state
    run_round(agg.new_round(0, _inputs(rng, [0, 1, 2], 30)), agg.stages)
    first = st_.server.key_id
    assert first is not None and {st_.clients[c].key_id for c in (0, 1, 2)} == {first}
    # Round 1: holders 1 and 2 are sampled with newcomers 3 and 4; the lowest holder seals the key.
    rnd = agg.new_round(1, _inputs(rng, [1, 2, 3, 4], 30))
    out = run_round(rnd, agg.stages)
    assert out.result.contributors == (1, 2, 3, 4) and out.result.measurements["key_generated"] == 0
    assert {st_.clients[c].key_id for c in (3, 4)} == {first}
    bundles = [msg for msg in out.observation.transcript if msg.stage == "keys"]
    assert [b.sender for b in bundles] == [1]
    # Round 2: client 0 still holds the key and seals it for newcomer 5 (no rotation yet).
    out = run_round(agg.new_round(2, _inputs(rng, [5, 0], 30)), agg.stages)
    assert st_.server.key_id == first == st_.clients[5].key_id and out.result.measurements["key_generated"] == 0
    # Round 3: rotation is due (3 rounds after round 0).
    out = run_round(agg.new_round(3, _inputs(rng, [1, 3], 30)), agg.stages)
    assert out.result.measurements["key_generated"] == 1 and st_.server.key_id not in (None, first)
    assert st_.clients[1].key_id == st_.server.key_id == st_.clients[3].key_id
    assert st_.clients[4].key_id == first  # a client that left keeps only the old key


def test_dropouts() -> None:
    rng = np.random.default_rng(13)
    agg = BFVAggregator(max_clients=6, min_clients=2, decryptors=2)
    # The key generator (lowest id) vanishes before sending the key: nobody can encrypt.
    with pytest.raises(RoundAbortedError, match="generator"):
        run_round(agg.new_round(0, _inputs(rng, [0, 1, 2], 20)), agg.stages, {0: "keys"})
    inputs = _inputs(rng, [0, 1, 2, 3], 20)
    out = run_round(agg.new_round(1, inputs), agg.stages, {2: "upload", 3: "start"})
    assert out.result.contributors == (0, 1) and out.dropped == {2: "upload", 3: "start"}
    want, w = _plain_sum(inputs, (0, 1), 1.0)
    assert np.max(np.abs(out.result.total - want)) <= agg.params.error_bound(2)
    # The first decryptor drops: the second one still decrypts.
    out = run_round(agg.new_round(2, _inputs(rng, [0, 1, 2], 20)), agg.stages, {0: "decrypt"})
    assert out.result.contributors == (0, 1, 2)
    with pytest.raises(RoundAbortedError):
        run_round(agg.new_round(3, _inputs(rng, [0, 1], 20)), agg.stages, {0: "decrypt", 1: "decrypt"})


def test_key_authority_delivers_the_public_context_once() -> None:
    rng = np.random.default_rng(14)
    agg = CKKSAggregator(key_mode="key-authority", max_clients=5)
    sizes = []
    for r in range(2):
        out = run_round(agg.new_round(r, _inputs(rng, [0, 1], 30)), agg.stages)
        sizes.append(out.traffic.down[0])
    assert sizes[0] > sizes[1] + 100_000  # the ~0.2 MB public context travels in round 0 only
    assert agg._state.authority.key_id == agg._state.server.key_id


def test_options_are_validated() -> None:
    assert {"ckks", "bfv"} <= set(AGGREGATORS.names())
    bad: list[tuple[dict[str, object], str]] = [
        ({"keymode": "client-held"}, "keymode"),
        ({"key_mode": "server-held"}, "key_mode"),
        ({"min_clients": 0}, "min_clients"),
        ({"min_clients": True}, "min_clients"),
        ({"max_clients": 3, "min_clients": 4}, "max_clients"),
        ({"precision": -1.0}, "precision"),
        ({"clip": "1"}, "clip"),
        ({"poly_modulus_degree": 2048}, "poly_modulus_degree"),
        ({"rotate_every": -1}, "rotate_every"),
        ({"decryptors": 0}, "decryptors"),
        ({"measure_error": 1}, "measure_error"),
        ({"precision": 1e-14}, "precision"),
    ]
    for name in ("ckks", "bfv"):
        for opts, key in bad:
            with pytest.raises(ConfigurationError, match=key):
                AGGREGATORS.create(name, **opts)
    agg = BFVAggregator(max_clients=3)
    with pytest.raises(ConfigurationError, match="max_clients"):
        agg.new_round(0, _inputs(np.random.default_rng(0), [0, 1, 2, 3], 5))
    with pytest.raises(ConfigurationError, match="max_weight"):
        agg.new_round(0, {0: ClientInput(np.zeros(5, np.float32), 2.0), 1: ClientInput(np.zeros(5, np.float32))})
