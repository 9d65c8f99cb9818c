"""Fixed-point encoding: known-answer vectors against a per-entry reference, unbiasedness, capacity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.protocols.encoding import ChunkQuantizer, FixedPointEncoder
from securefed.protocols.errors import ConfigurationError, OverflowRiskError

VECTORS = Path(__file__).parent / "vectors" / "secagg_encoding.json"


def ref_encode(x: np.ndarray, weight: float, clip: float, f: int, bits: int, seed: bytes) -> tuple[list[int], int]:
    """One entry at a time with Python floats: clip, scale, add u/2^32, floor, wrap mod 2^b."""
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    raw = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range((4 * len(x) + 15) // 16))
    scale = weight * 2.0**f
    out, clipped = [], 0
    for i, v in enumerate(x.tolist()):
        if abs(v) > clip:
            clipped += 1
        c = min(max(v, -clip), clip)
        u = int.from_bytes(raw[4 * i:4 * i + 4], "little") * 2.0**-32
        out.append(math.floor(c * scale + u) % (1 << bits))
    return out, clipped


@pytest.mark.parametrize("case", json.loads(VECTORS.read_text())["cases"], ids=lambda c: f"b{c['modulus_bits']}")
def test_encoding_vectors(case: dict[str, Any]) -> None:
    x = np.frombuffer(bytes.fromhex(case["x_float32_hex"]), dtype="<f4").astype(np.float32)
    seed = bytes.fromhex(case["rounding_seed"])
    enc = FixedPointEncoder(case["clip"], case["scale_bits"], case["modulus_bits"], max(case["weight"], 1.0))
    got = enc.encode_fast(x, case["weight"], seed)
    assert [int(v) for v in got.values] == case["values"]
    assert got.clipped == case["clipped"]
    ref, ref_clipped = ref_encode(x, case["weight"], case["clip"], case["scale_bits"], case["modulus_bits"], seed)
    assert ref == case["values"] and ref_clipped == case["clipped"]
    exact = case["weight"] * np.clip(x.astype(np.float64), -case["clip"], case["clip"])
    assert np.max(np.abs(enc.decode_sum(got.values) - exact)) \
        < 2.0 ** -case["scale_bits"]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=40),
    clip=st.sampled_from([1e-3, 0.1, 1.0, 3.0, 1000.0]),
    f=st.integers(0, 20),
    weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    seed=st.binary(min_size=32, max_size=32),
)
def test_fast_encoder_matches_the_reference(values: list[float], clip: float, f: int, weight: float, seed: bytes) -> None:
    x = np.array(values, dtype=np.float32)
    enc = FixedPointEncoder(clip, f, 48, max_weight=4.0)
    got = enc.encode_fast(x, weight, seed)
    ref, clipped = ref_encode(x, weight, clip, f, 48, seed)
    assert [int(v) for v in got.values] == ref
    assert got.clipped == clipped


def test_float64_inputs_and_clip_count_edges() -> None:
    enc = FixedPointEncoder(0.1, 12)
    q = ChunkQuantizer(enc, 1.0, 8)
    c32 = np.float32(0.1)  # slightly above 0.1
    x = np.array([c32, np.nextafter(c32, np.float32(0)), -c32, 0.0], dtype=np.float32)
    assert q.count_clipped(x) == 2
    assert q.count_clipped(x.astype(np.float64)) == 2
    assert q.count_clipped(np.array([0.1, -0.1, 0.1000001])) == 1
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            q.count_clipped(np.array([0.0, bad], dtype=np.float32))
        with pytest.raises(ValueError):
            enc.encode_fast(np.array([bad], dtype=np.float32))
    with pytest.raises(ConfigurationError, match="max_weight"):
        ChunkQuantizer(enc, 2.0, 8)


def test_stochastic_rounding_is_unbiased() -> None:
    enc = FixedPointEncoder(1.0, 3, 32)
    frac = np.array([0.0, 0.125 * 0.3, 0.125 * 0.5, -0.125 * 0.77, 0.125 * (1 - 2**-20)], dtype=np.float64)
    x = np.tile(frac, 40_000)
    got = enc.to_signed(enc.encode_fast(x).values).reshape(-1, len(frac)).astype(np.float64)
    mean = got.mean(axis=0) / 8
    # binomial standard error of each mean is at most 0.5/8/sqrt(40000) = 3.1e-4 grid units
    np.testing.assert_allclose(mean, frac, atol=5 * 0.5 / 8 / 200)
    assert set(np.unique(got[:, 0])) == {0.0}  # exact grid points never move


def test_capacity_check_names_the_knobs() -> None:
    enc = FixedPointEncoder(clip=8.0, scale_bits=22, modulus_bits=32, max_weight=1.0)
    assert enc.max_clients() == (2**31 - 1) // (8 * 2**22 + 1)
    enc.check_capacity(enc.max_clients())
    with pytest.raises(OverflowRiskError, match="modulus_bits.*scale_bits.*clip.*max_weight"):
        enc.check_capacity(enc.max_clients() + 1)
    with pytest.raises(OverflowRiskError):
        FixedPointEncoder(clip=1.0, scale_bits=40, modulus_bits=32)


def test_sum_of_max_capacity_clients_does_not_wrap() -> None:
    enc = FixedPointEncoder(clip=1.0, scale_bits=4, modulus_bits=10)
    n = enc.max_clients()
    x = np.full(16, 1.0, dtype=np.float32)
    total = np.zeros(16, dtype=np.uint32)
    for _ in range(n):
        enc.add(total, enc.encode_fast(x).values)
    np.testing.assert_array_equal(enc.decode_sum(total), np.full(16, float(n)))
    for _ in range(n):  # and the negative side
        enc.add(total, enc.encode_fast(-x).values)
        enc.add(total, enc.encode_fast(-x).values)
    np.testing.assert_array_equal(enc.decode_sum(total), np.full(16, -float(n)))
