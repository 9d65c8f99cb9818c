"""Every registered PEFT method: only adapter tensors train; flatten/unflatten round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securefed.assets.models import load_model
from securefed.errors import ConfigError, UpdateError
from securefed.peft import PEFT_METHODS, AdapterOptions, AdapterSpec


@pytest.mark.parametrize("name", PEFT_METHODS.names())
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_flatten_unflatten_round_trip(name: str, model_name: str) -> None:
    loaded = load_model(model_name)
    method = PEFT_METHODS.get(name)
    targets = ("q_proj", "v_proj") if model_name == "tiny-llama" else ("c_attn",)
    model = method.apply(loaded.model, AdapterOptions(r=4, target_modules=targets), task="causal-lm")
    spec = method.spec(model)
    state = method.trainable_state(model)
    assert spec.dim == sum(p.numel() for p in state.values()) > 0
    # Base weights never appear in the spec.
    assert all("lora_" in n for n in spec.names), spec.names
    vec = np.random.default_rng(0).standard_normal(spec.dim).astype(np.float32)
    method.load_state(model, spec.unflatten(vec))
    np.testing.assert_array_equal(spec.flatten(method.trainable_state(model)), vec)
    assert AdapterSpec.from_json(spec.to_json()) == spec


def test_frozen_base_does_not_change_in_training(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    method = PEFT_METHODS.get("lora")
    model = method.apply(load_model("tiny-llama").model, AdapterOptions(r=4), task="causal-lm")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 1000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_spec_rejects_bad_updates() -> None:
    spec = AdapterSpec.from_state("lora", {"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    assert spec.dim == 10
    with pytest.raises(UpdateError, match="10"):
        spec.check(np.zeros(9, dtype=np.float32))
    bad = np.zeros(10, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(UpdateError, match="NaN"):
        spec.check(bad)
    with pytest.raises(UpdateError):
        spec.unflatten(np.full(10, np.inf, dtype=np.float32))


def test_bad_peft_options() -> None:
    with pytest.raises(ConfigError, match="peft.method"):
        PEFT_METHODS.get("adapterx")
    with pytest.raises(ConfigError, match="peft.r"):
        AdapterOptions(r=0)
    with pytest.raises(ConfigError, match="target_modules"):
        PEFT_METHODS.get("lora").apply(load_model("tiny-llama").model, AdapterOptions(target_modules=("c_attn",)), task="causal-lm")
