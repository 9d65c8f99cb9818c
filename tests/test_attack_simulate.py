"""DP-SGD helpers of attacks/simulate.py.

Oracle: the straightforward loop (one backward per example, the norm over
every trainable tensor, in float64). The batched fast path must give the
same clipped sum, for a full model with a tied embedding and for LoRA.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from securefed.assets.data import Example
from securefed.assets.models import load_model
from securefed.attacks.simulate import (
    clipped_gradient_sum,
    dp_noised_update,
    dp_sgd_update,
    fast_clipped_gradient_sum,
    full_spec,
    lora_model,
)
from securefed.protocols.csprng import KeyStream
from securefed.tasks import make_task

TEXTS = [
    "a gripping, funny and humane film",
    "dull",
    "the plot goes nowhere and the actors know it , a long slog",
    "the plot twists keep coming",
    "an old-fashioned but charming drama",
]


@pytest.fixture(scope="module")
def setup():
    lm = load_model("tiny-llama", dtype=torch.float64)
    task = make_task("verbalized", lm.tokenizer, dataset="rotten-tomatoes", max_length=64)
    examples = [Example(t, i % 2) for i, t in enumerate(TEXTS)]
    return lm.model, task, examples


def _loss(task, examples, reduce):
    b = task.batch(examples)  # right-padded: examples of different lengths
    return lambda m: reduce(task.per_example_loss(m, b))


def _oracle_losses(task, examples):
    return [_loss(task, [e], torch.mean) for e in examples]


def _batched_losses(task, examples, chunk):
    return [_loss(task, examples[i : i + chunk], lambda x: x) for i in range(0, len(examples), chunk)]


def _norms(model, task, examples):
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = []
    for e in examples:
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model, task.batch([e])).mean().backward()
        out.append(float(sum(p.grad.double().pow(2).sum() for p in trainable if p.grad is not None)) ** 0.5)
    model.zero_grad(set_to_none=True)
    return out


def _kinds(base):
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)  # full fine-tuning: clip over every weight (tied embedding included)
    spec, params = full_spec(full, layers=1)  # but keep only layer 0's tensors, as the benchmark does
    yield "full", full, spec, params
    lora, lspec, lparams = lora_model(copy.deepcopy(base), r=4, alpha=8, b_std=0.02, seed=1)
    yield "lora", lora, lspec, lparams


@pytest.mark.parametrize("regime", ["mixed", "all-clipped", "none-clipped"])
def test_fast_clipped_sum_matches_per_example_loop(setup, regime):
    base, task, examples = setup
    for name, model, spec, params in _kinds(base):
        norms = sorted(_norms(model, task, examples))
        clip = {"mixed": (norms[1] + norms[2]) / 2, "all-clipped": norms[0] / 2, "none-clipped": norms[-1] * 2}[regime]
        ref, ref_stats = clipped_gradient_sum(model, spec, params, _oracle_losses(task, examples), clip=clip)
        assert np.abs(ref).max() > 0
        for chunk in (1, 2, 5):
            fast, stats = fast_clipped_gradient_sum(model, spec, params, _batched_losses(task, examples, chunk), clip=clip)
            assert fast.dtype == np.float64 and fast.shape == (spec.dim,)
            assert stats == ref_stats, (name, chunk)
            # chunk 1: the same forward as the loop, so only the hooks' algebra differs: equal to
            # float64 rounding. Padded chunks: the model itself (its RMSNorm computes in float32)
            # gives each example's loss to float32 rounding only, so compare at that level.
            tol = 1e-12 if chunk == 1 else 1e-6
            np.testing.assert_allclose(fast, ref, rtol=0, atol=tol * np.abs(ref).max(), err_msg=f"{name} chunk {chunk}")
        expected = {"mixed": 3 / 5, "all-clipped": 1.0, "none-clipped": 0.0}[regime]
        assert ref_stats["clipped_fraction"] == pytest.approx(expected)
        # The hooks leave the model as they found it.
        assert all(p.grad is None for p in model.parameters())
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= set(spec.names)


def test_unclipped_sum_is_the_batch_gradient(setup):
    """With a clip above every norm, the clipped sum is the plain gradient of the summed loss."""
    base, task, examples = setup
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    spec, params = full_spec(model, layers=2)
    fast, stats = fast_clipped_gradient_sum(model, spec, params, _batched_losses(task, examples, 5), clip=1e9)
    model.zero_grad(set_to_none=True)
    task.per_example_loss(model, task.batch(examples)).sum().backward()
    grads = torch.cat([params[n].grad.reshape(-1) for n in spec.names]).numpy()
    model.zero_grad(set_to_none=True)
    assert stats["clipped_fraction"] == 0.0
    np.testing.assert_allclose(fast, grads, rtol=0, atol=1e-12 * np.abs(grads).max())


def test_fast_path_refuses_unsupported_modules(setup):
    base, task, examples = setup
    model = copy.deepcopy(base)
    model.extra = torch.nn.Conv1d(1, 1, 1)  # owns a trainable 3-D weight the hooks do not cover
    spec, params = full_spec(model, layers=1)
    with pytest.raises(NotImplementedError, match="Conv1d"):
        fast_clipped_gradient_sum(model, spec, params, _batched_losses(task, examples, 5), clip=1.0)
    assert all(p.requires_grad for p in model.parameters())


def test_dp_noised_update_is_the_dp_sgd_formula():
    total = np.linspace(-1.0, 1.0, 1000)
    seed = bytes(range(32))
    got = dp_noised_update(total, 4, lr=0.5, clip=2.0, noise_multiplier=0.7, stream=KeyStream(seed))
    noise = KeyStream(seed).standard_normal(1000) * (0.7 * 2.0)
    np.testing.assert_allclose(got, (-0.5 * (total + noise) / 4).astype(np.float32))
    assert got.dtype == np.float32
    # The noise is N(0, (sigma*C)^2): check its scale on a large draw.
    big = dp_noised_update(np.zeros(200_000), 1, lr=1.0, clip=2.0, noise_multiplier=0.7)
    assert float(np.std(big)) == pytest.approx(1.4, rel=0.02)
    with pytest.raises(ValueError):
        dp_noised_update(total, 0, lr=1.0, clip=1.0, noise_multiplier=1.0)


def test_dp_sgd_update_uses_the_clipped_sum(setup):
    base, task, examples = setup
    model = copy.deepcopy(base)
    spec, params = full_spec(model, layers=1)
    for p in model.parameters():
        p.requires_grad_(True)
    seed = bytes(32)
    vec, stats = dp_sgd_update(model, spec, params, _oracle_losses(task, examples), lr=0.1, clip=0.5,
                               noise_multiplier=1.0, stream=KeyStream(seed))
    total, _ = clipped_gradient_sum(model, spec, params, _oracle_losses(task, examples), clip=0.5)
    np.testing.assert_array_equal(vec, dp_noised_update(total, 5, lr=0.1, clip=0.5, noise_multiplier=1.0, stream=KeyStream(seed)))
    assert 0.0 <= stats["clipped_fraction"] <= 1.0
