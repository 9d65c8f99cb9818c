"""What the server sees of one client: uniformly random ring vectors, whatever the input."""

from __future__ import annotations

import numpy as np
from scipy import stats
from test_secagg_harness import make

from securefed.fl.transport import run_round
from securefed.protocols import ClientInput
from securefed.protocols.encoding import FixedPointEncoder
from securefed.protocols.secagg.masking import MaskStream, encode_and_mask


def test_masked_vectors_of_a_constant_input_are_uniform() -> None:
    """Chi-square over all 256 residues of Z_2^8 and over the top byte of Z_2^32."""
    d = 20_000
    for bits, bins in ((8, 256), (32, 256)):
        agg = make("secagg+", modulus_bits=bits, scale_bits=2 if bits == 8 else 16, corrupt_fraction=0.0, k=4)
        x = np.full(d, 0.25, dtype=np.float32)  # every client uploads the same constant
        out = run_round(agg.new_round(0, {c: ClientInput(x) for c in range(10)}), agg.stages)
        masked = out.observation.masked_updates
        assert masked is not None and len(masked) == 10
        for y in masked.values():
            residues = (y.astype(np.uint64) >> np.uint64(bits - 8)).astype(np.int64) if bits > 8 else y.astype(np.int64)
            counts = np.bincount(residues, minlength=bins)
            assert stats.chisquare(counts).pvalue > 1e-6
        ys = list(masked.values())
        assert not np.array_equal(ys[0], ys[1])
        np.testing.assert_array_equal(out.result.total, np.full(d, 10 * 0.25))


def test_pairwise_masks_cancel_and_self_mask_hides() -> None:
    enc = FixedPointEncoder(1.0, 8, 32)
    x = np.linspace(-0.5, 0.5, 1000).astype(np.float32)
    pair = b"\x01" * 32
    zero = np.zeros(2, dtype=np.int64)
    ya, _ = encode_and_mask(x, zero, encoder=enc, weight=1.0, rounding_seed=b"\x02" * 32,
                            streams=[MaskStream(pair)])
    yb, _ = encode_and_mask(x, zero, encoder=enc, weight=1.0, rounding_seed=b"\x02" * 32,
                            streams=[MaskStream(pair, negate=True)])
    plain, _ = encode_and_mask(x, zero, encoder=enc, weight=1.0, rounding_seed=b"\x02" * 32, streams=[])
    np.testing.assert_array_equal(ya + yb, plain + plain)
    assert stats.chisquare(np.bincount((ya >> np.uint32(24)).astype(np.int64), minlength=256)).pvalue > 1e-6
