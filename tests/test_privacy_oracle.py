"""Per-sample correctness of DP-SGD: Opacus's clipped gradient sum against a by-hand oracle.

Oracle: each example's gradient computed alone with plain autograd, clipped
to C, summed (securefed.privacy.oracle.clipped_sum_oracle). Both sides run in
float64 with dropout 0 and noise 0; C = 1e-3 is far below every per-example
norm, so clipping is exercised for every example. Agreement is ~1e-6 relative
(Opacus divides by ||g|| + 1e-6); the failures this test exists for (prompt
tuning) are > 0.1, so the tolerance 1e-4 separates them by three orders.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from securefed.privacy.dp_sgd import MODES, check_dp_support, private_module, train_dp_sgd
from securefed.privacy.errors import OracleMismatchError, UnsupportedMethodError
from securefed.privacy.events import GaussianEvent, PoissonSampledEvent, SelfComposedEvent
from securefed.privacy.oracle import (
    check_against_oracle,
    clipped_sum_oracle,
    opacus_clipped_sum,
    relative_error,
)
from securefed.privacy.secure_noise import FastNoise, SecureNoise
from securefed.protocols.csprng import KeyStream

VOCAB, SEQ = 1000, 12
TOL = 1e-4


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def with_lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # B = 0 at init makes A's gradient 0; give both factors a gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.double()


def data(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (SEQ,), generator=g) for _ in range(n)]


def make_batch(examples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(examples))


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token NLL; virtual tokens (prompt/prefix) are cut off the logits."""
    logits = model(input_ids=ids).logits[:, -ids.shape[1]:][:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.mean(1)


LORA_CASES = {
    "tiny-llama": lambda: with_lora(tiny_llama(), ["q_proj", "v_proj"]),
    "tiny-gpt2": lambda: with_lora(tiny_gpt2(), ["c_attn"]),
}


@pytest.fixture(scope="module", params=sorted(LORA_CASES))
def lora_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return LORA_CASES[request.param]()


@pytest.mark.parametrize("mode", MODES)
def test_lora_matches_oracle(lora_model: torch.nn.Module, mode: str) -> None:
    norms: list[float] = []
    err = check_against_oracle(
        lora_model, data(), make_batch=make_batch, per_example_loss=lm_loss, clip=1e-3, mode=mode,
        tolerance=TOL, norms=norms,
    )
    assert err < TOL
    assert len(norms) == 6 and min(norms) > 1e-2  # C is far below every norm: clipping is exercised


def test_oracle_detects_a_wrong_clip(lora_model: torch.nn.Module) -> None:
    """The comparison can fail: a clip of 2C on one side is caught."""
    batch = data()
    want = clipped_sum_oracle(lora_model, batch, make_batch=make_batch, per_example_loss=lm_loss, clip=1e-3)
    got = opacus_clipped_sum(lora_model, batch, make_batch=make_batch, per_example_loss=lm_loss, clip=2e-3, mode="hooks")
    assert relative_error(got, want) > 0.5


def _peft(kind: str) -> torch.nn.Module:
    cfg = {
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
        "ia3": IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
    }[kind]
    return get_peft_model(tiny_llama(), cfg).double()


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_prefix_tuning_matches_oracle(mode: str) -> None:
    m = _peft("prefix")
    check_dp_support(m, mode)
    err = check_against_oracle(m, data(), make_batch=make_batch, per_example_loss=lm_loss, clip=1e-3, mode=mode)
    assert err < TOL


def test_prompt_tuning_fails_oracle_and_is_refused() -> None:
    m = _peft("prompt")
    with pytest.raises(OracleMismatchError, match="differs from the by-hand oracle"):
        check_against_oracle(m, data(), make_batch=make_batch, per_example_loss=lm_loss, clip=1e-3, mode="hooks")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for mode in MODES:
        with pytest.raises(UnsupportedMethodError, match="prompt tuning fails the per-sample gradient oracle"):
            train_dp_sgd(m, data(20), make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=1,
                         expected_batch_size=4, noise_multiplier=1.0, clip=1.0, noise=FastNoise(0), mode=mode)


def test_ia3_and_ghost_prefix_are_refused() -> None:
    with pytest.raises(UnsupportedMethodError, match="IA3"):
        check_dp_support(_peft("ia3"), "hooks")
    with pytest.raises(UnsupportedMethodError, match="ghost"):
        check_dp_support(_peft("prefix"), "ghost")
    # A registry name alone is enough to refuse, whatever the model says.
    with pytest.raises(UnsupportedMethodError, match="prompt tuning"):
        check_dp_support(LORA_CASES["tiny-llama"](), "hooks", method="prompt-tuning")


def test_every_registered_dp_method_matches_oracle() -> None:
    """Every PEFT method the registry offers with DP passes the oracle in every mode it allows."""
    registry = pytest.importorskip("securefed.peft.registry")
    offered = [(name, m) for name, m in registry.PEFT_METHODS.items() if getattr(m, "supports_dp", False)]
    assert offered, "the registry offers no DP method"
    for name, method in offered:
        model = method.apply(tiny_llama(), registry.AdapterOptions(r=4, target_modules=("q_proj", "v_proj")), task="causal-lm")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and torch.count_nonzero(p) == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model = model.double()
        for mode in MODES:
            try:
                check_dp_support(model, mode, method=name)
            except UnsupportedMethodError:
                continue
            err = check_against_oracle(model, data(), make_batch=make_batch, per_example_loss=lm_loss, clip=1e-3, mode=mode)
            assert err < TOL, (name, mode, err)


def _lora_params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_dp_sgd_changes_only_adapter_and_reports_event() -> None:
    m = LORA_CASES["tiny-llama"]()
    before = _lora_params(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    res = train_dp_sgd(m, data(40), make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=3,
                       expected_batch_size=4, noise_multiplier=1.0, clip=0.5, noise=SecureNoise(), mode="hooks")
    after = _lora_params(m)
    for n, p in m.named_parameters():
        changed = not torch.equal(before[n], after[n])
        assert changed == p.requires_grad, n
    assert res.steps == 3 and len(res.batch_sizes) == 3 and res.secure
    assert res.event == SelfComposedEvent(PoissonSampledEvent(0.1, GaussianEvent(1.0)), 3)
    assert not any(hasattr(p, "grad_sample") for p in m.parameters())  # hooks removed


def test_one_secure_step_equals_by_hand_dp_sgd() -> None:
    """Poisson batch, clipping, CSPRNG noise and the 1/B scaling, replayed from the same seed."""
    seed, n, B, C, sigma, lr = bytes(range(32)), 20, 4, 1e-3, 0.7, 0.5
    examples = data(n, seed=3)
    m = LORA_CASES["tiny-llama"]()
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    start = {k: p.detach().clone() for k, p in named}
    opt = torch.optim.SGD([p for _, p in named], lr=lr)
    res = train_dp_sgd(m, examples, make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=1,
                       expected_batch_size=B, noise_multiplier=sigma, clip=C, noise=SecureNoise(KeyStream(seed)))
    # Replay: same stream -> same Poisson mask, then one Gaussian per parameter in order.
    replay = SecureNoise(KeyStream(seed))
    mask = replay.uniform(n) < B / n
    picked = [examples[i] for i in np.nonzero(mask)[0]]
    assert len(picked) == res.batch_sizes[0] > 0
    got = {k: p.detach().clone() for k, p in named}
    with torch.no_grad():
        for k, p in named:
            p.copy_(start[k])
    clipped = clipped_sum_oracle(m, picked, make_batch=make_batch, per_example_loss=lm_loss, clip=C)
    for k, p in named:
        noise = replay.gaussian(p.shape, sigma * C, dtype=p.dtype)
        want = start[k] - lr * (clipped[k] + noise) / B
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-9)


def test_physical_batches_do_not_change_the_update() -> None:
    examples = data(30, seed=5)
    out = []
    for chunk in (None, 2):
        m = LORA_CASES["tiny-llama"]()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        train_dp_sgd(m, examples, make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=2,
                     expected_batch_size=6, noise_multiplier=0.5, clip=1e-3, noise=FastNoise(7),
                     max_physical_batch=chunk)
        out.append({k: p.detach() for k, p in m.named_parameters() if p.requires_grad})
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-7, atol=1e-10)


def test_empty_poisson_batch_still_adds_noise() -> None:
    m = LORA_CASES["tiny-llama"]()
    before = _lora_params(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)

    class NeverSample(FastNoise):
        def uniform(self, n: int) -> np.ndarray:
            return np.ones(n)

    res = train_dp_sgd(m, data(10), make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=1,
                       expected_batch_size=2, noise_multiplier=1.0, clip=1.0, noise=NeverSample(0))
    assert res.batch_sizes == (0,) and res.steps == 1
    moved = [n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())]
    assert moved and all("lora" in n for n in moved)


def test_bad_dp_sgd_arguments() -> None:
    m = LORA_CASES["tiny-llama"]()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    kw = dict(make_batch=make_batch, per_example_loss=lm_loss, optimizer=opt, steps=1, expected_batch_size=2, noise=FastNoise(0))
    with pytest.raises(ValueError, match="clip"):
        train_dp_sgd(m, data(10), noise_multiplier=1.0, clip=0.0, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise_multiplier"):
        train_dp_sgd(m, data(10), noise_multiplier=0.0, clip=1.0, **kw)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedMethodError, match="mode"):
        train_dp_sgd(m, data(10), noise_multiplier=1.0, clip=1.0, mode="ew", **kw)  # type: ignore[arg-type]
    with private_module(m, opt, mode="hooks", clip=1.0, noise_multiplier=1.0, expected_batch_size=2, noise=FastNoise(0)):
        pass
    assert not any(hasattr(p, "grad_sample") for p in m.parameters())
