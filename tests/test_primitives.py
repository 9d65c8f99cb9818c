"""Crypto primitives against known-answer vectors and independent slow references.

References written here, independent of the code under test:
* the mask PRG from AES-256-*ECB* encryptions of big-endian counter blocks;
* HKDF-SHA256 from :mod:`hmac` (RFC 5869 §2.2-2.3) and the KDF ``info`` from its documented layout;
* Shamir reconstruction by Gaussian elimination on the Vandermonde system mod p;
* primality of p by Miller-Rabin and by ``sympy``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sympy
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefed.protocols.csprng import KeyStream, ctr_encryptor
from securefed.protocols.errors import ConfigurationError, DecodeError, IntegrityError
from securefed.protocols.primitives import aead, kex, shamir, sign
from securefed.protocols.primitives.kex import KeyContext
from securefed.protocols.secagg.masking import MaskStream, apply_masks, expand_mask

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


# -- independent references ----------------------------------------------------


def ref_keystream(seed: bytes, nbytes: int) -> bytes:
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = (nbytes + 15) // 16
    return b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(blocks))[:nbytes]


def ref_mask(seed: bytes, length: int, bits: int) -> list[int]:
    width = 4 if bits <= 32 else 8
    raw = ref_keystream(seed, width * length)
    return [int.from_bytes(raw[i * width:(i + 1) * width], "little") % (1 << bits) for i in range(length)]


def ref_hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def ref_info(protocol: str, version: int, rnd: int, a: int, b: int, purpose: str) -> bytes:
    lo, hi = min(a, b), max(a, b)
    p, u = protocol.encode(), purpose.encode()
    return (b"securefed/kdf/v1|" + len(p).to_bytes(2, "big") + p + struct.pack(">IQqq", version, rnd, lo, hi)
            + len(u).to_bytes(2, "big") + u)


def ref_interpolate(points: list[tuple[int, int]], p: int) -> int:
    """Solve the Vandermonde system for the coefficients by Gauss-Jordan elimination; return a_0."""
    t = len(points)
    rows = [[pow(x, j, p) for j in range(t)] + [y] for x, y in points]
    for col in range(t):
        piv = next(r for r in range(col, t) if rows[r][col] % p)
        rows[col], rows[piv] = rows[piv], rows[col]
        inv = pow(rows[col][col], p - 2, p)
        rows[col] = [v * inv % p for v in rows[col]]
        for r in range(t):
            if r != col and rows[r][col]:
                f = rows[r][col]
                rows[r] = [(a - f * b) % p for a, b in zip(rows[r], rows[col], strict=True)]
    return rows[0][t]


# -- PRG ---------------------------------------------------------------------------


def test_ecb_reference_matches_fips197() -> None:
    key = bytes(range(32))
    ct = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert ct.hex() == "8ea2b7ca516745bfeafc49904b496089"  # FIPS-197 Appendix C.3


@pytest.mark.parametrize("case", _load("secagg_prg.json")["cases"], ids=lambda c: f"b{c['modulus_bits']}")
def test_prg_vectors(case: dict[str, Any]) -> None:
    seed, bits, values = bytes.fromhex(case["seed"]), case["modulus_bits"], case["values"]
    assert [int(v) for v in expand_mask(seed, len(values), bits)] == values
    assert ref_mask(seed, len(values), bits) == values
    assert [int(v) for v in KeyStream(seed).uniform_uint(len(values), bits)] == values


def test_prg_is_position_addressable_and_thread_independent() -> None:
    seed = hashlib.sha256(b"x").digest()
    full = ref_keystream(seed, 4096)
    for off in (0, 16, 1024, 4080):
        out = bytearray(len(full) - off)
        ctr_encryptor(seed, off).update_into(bytes(len(out)), out)
        assert bytes(out) == full[off:]
    with pytest.raises(ValueError):
        ctr_encryptor(seed, 3)
    streams = [MaskStream(hashlib.sha256(bytes([i])).digest(), negate=bool(i % 2)) for i in range(5)]
    n = 3 * 32768 + 11
    a, b = np.zeros(n, np.uint32), np.zeros(n, np.uint32)
    apply_masks(a, streams, modulus_bits=32, threads=1)
    apply_masks(b, streams, modulus_bits=32, threads=3)
    np.testing.assert_array_equal(a, b)
    expect = np.zeros(n, np.uint64)
    for s in streams:
        m = np.array(ref_mask(s.seed, n, 32), dtype=np.uint64)
        expect = (expect - m) if s.negate else (expect + m)
    np.testing.assert_array_equal(a, (expect % (1 << 32)).astype(np.uint32))


# -- HKDF / X25519 ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _load("secagg_hkdf.json")["cases"], ids=lambda c: c["purpose"])
def test_hkdf_vectors(case: dict[str, Any]) -> None:
    secret, info = bytes.fromhex(case["secret"]), bytes.fromhex(case["info"])
    a, b = case["pair"]
    ctx = KeyContext(case["protocol"], 1, case["round"], case["purpose"])
    assert ctx.info(a, b) == info == ctx.info(b, a)
    assert ref_info(case["protocol"], 1, case["round"], a, b, case["purpose"]) == info
    assert kex.hkdf(secret, info).hex() == case["okm"] == ref_hkdf(secret, info).hex()


def test_published_vectors() -> None:
    pub = _load("secagg_hkdf.json")["published"]
    for v in pub[:2]:
        ikm, salt, info = bytes.fromhex(v["ikm"]), bytes.fromhex(v["salt"]), bytes.fromhex(v["info"])
        assert ref_hkdf(ikm, info, v["length"], salt).hex() == v["okm"]
        assert kex.hkdf(ikm, info, v["length"], salt or None).hex() == v["okm"]
    x = pub[2]
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(x["alice_private"]))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(x["bob_private"]))
    assert kex.public_bytes(alice).hex() == x["alice_public"]
    assert alice.exchange(kex.load_public(bytes.fromhex(x["bob_public"]))).hex() == x["shared"]
    ctx = KeyContext("secagg", 1, 3, "pairwise-mask-seed")
    k_ab = kex.agree(alice, bytes.fromhex(x["bob_public"]), ctx, 1, 2)
    assert k_ab == kex.agree(bob, bytes.fromhex(x["alice_public"]), ctx, 2, 1)
    assert k_ab == ref_hkdf(bytes.fromhex(x["shared"]), ref_info("secagg", 1, 3, 1, 2, "pairwise-mask-seed"))
    assert k_ab != kex.agree(alice, bytes.fromhex(x["bob_public"]), KeyContext("secagg", 1, 3, "share-encryption"), 1, 2)
    assert k_ab != kex.agree(alice, bytes.fromhex(x["bob_public"]), KeyContext("secagg", 1, 4, "pairwise-mask-seed"), 1, 2)


def test_low_order_and_malformed_public_keys_are_refused() -> None:
    sk, _ = kex.generate_keypair()
    ctx = KeyContext("secagg", 1, 0, "m")
    with pytest.raises(DecodeError):
        kex.agree(sk, bytes(32), ctx, 0, 1)  # all-zero shared secret
    with pytest.raises(DecodeError):
        kex.agree(sk, bytes(31), ctx, 0, 1)


# -- Shamir -------------------------------------------------------------------------------


def test_prime_is_the_smallest_prime_above_2_256() -> None:
    p = shamir.PRIME
    assert p > 2**256 and sympy.isprime(p)  # sympy: BPSW, an implementation independent of ours
    assert sympy.nextprime(2**256) == p


@pytest.mark.parametrize("case", _load("secagg_shamir.json")["cases"], ids=lambda c: f"t{c['threshold']}")
def test_shamir_vectors(case: dict[str, Any]) -> None:
    secret, t = bytes.fromhex(case["secret"]), case["threshold"]
    shares = {int(x): int(v, 16) for x, v in case["shares"].items()}
    for subset in itertools.islice(itertools.combinations(sorted(shares), t), 60):
        chosen = {x: shares[x] for x in subset}
        assert shamir.reconstruct(chosen, t) == secret
        assert ref_interpolate(list(chosen.items()), shamir.PRIME) == int.from_bytes(secret, "big")
    with pytest.raises(ConfigurationError):
        shamir.reconstruct(dict(list(shares.items())[: t - 1]), t)


def test_shamir_split_reconstructs_from_every_threshold_subset() -> None:
    secret = hashlib.sha256(b"s").digest()
    xs = [3, 8, 9, 15, 16, 23]
    for t in (2, 3, 6):
        shares = shamir.split(secret, t, xs)
        for subset in itertools.combinations(xs, t):
            assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret
        # t - 1 shares determine nothing: every candidate secret is consistent with them
        if t == 2:
            x0 = xs[0]
            other = hashlib.sha256(b"other").digest()
            slope = (shares[x0] - int.from_bytes(other, "big")) * pow(x0, -1, shamir.PRIME) % shamir.PRIME
            assert (int.from_bytes(other, "big") + slope * x0) % shamir.PRIME == shares[x0]


def test_shamir_rejects_bad_input_and_detects_out_of_range_results() -> None:
    secret = bytes(32)
    with pytest.raises(ConfigurationError):
        shamir.split(secret, 1, [1, 2])
    with pytest.raises(ConfigurationError):
        shamir.split(secret, 3, [1, 2])
    with pytest.raises(ConfigurationError):
        shamir.split(secret, 2, [1, 1, 2])
    with pytest.raises(ConfigurationError):
        shamir.split(secret, 2, [0, 1])
    with pytest.raises(ConfigurationError):
        shamir.split(secret[:31], 2, [1, 2])
    shares = shamir.split(b"\xff" * 32, 2, [1, 2])
    detected = 0
    for delta in range(1, 40):
        bad = {1: (shares[1] + delta) % shamir.PRIME, 2: shares[2]}
        try:
            assert shamir.reconstruct(bad, 2) != b"\xff" * 32
        except IntegrityError:
            detected += 1
    assert detected > 0  # values >= 2^256 are refused outright
    with pytest.raises(DecodeError):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(33, "big"))
    with pytest.raises(DecodeError):
        shamir.share_from_bytes(bytes(32))


# -- Ed25519 and AES-GCM -------------------------------------------------------------------------


def test_ed25519_sign_verify_and_domain_separation() -> None:
    sk, pk = sign.generate_signing_key()
    msg = sign.signed_message("ctx", b"ab", b"c")
    sig = sign.sign(sk, msg)
    sign.verify(pk, msg, sig)
    assert sign.signed_message("ctx", b"a", b"bc") != msg
    assert sign.signed_message("other", b"ab", b"c") != msg
    with pytest.raises(IntegrityError):
        sign.verify(pk, sign.signed_message("ctx", b"a", b"bc"), sig)
    bad = bytearray(sig)
    bad[5] ^= 1
    with pytest.raises(IntegrityError):
        sign.verify(pk, msg, bytes(bad))
    with pytest.raises(IntegrityError):
        sign.verify(sign.generate_signing_key()[1], msg, sig)
    with pytest.raises(DecodeError):
        sign.verify(pk, msg, sig[:63])
    with pytest.raises(DecodeError):
        sign.verify(pk[:31], msg, sig)


def test_aead_binds_its_context() -> None:
    key = hashlib.sha256(b"k").digest()
    ad = aead.associated_data("secagg", 1, "share_keys", 3, 4)
    ct = aead.encrypt(key, b"hello", ad)
    assert aead.decrypt(key, ct, ad) == b"hello"
    for other in (aead.associated_data("secagg", 2, "share_keys", 3, 4), aead.associated_data("secagg", 1, "share_keys", 4, 3),
                  aead.associated_data("secagg+", 1, "share_keys", 3, 4)):
        with pytest.raises(IntegrityError):
            aead.decrypt(key, ct, other)
    with pytest.raises(DecodeError):
        aead.decrypt(key, ct[:20], ad)
