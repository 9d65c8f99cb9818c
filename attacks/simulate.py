"""Build the server views of controlled experiments (tests, benchmarks).

The federated loop records real views; to measure attacks on settings the loop
does not run (a full fine-tuning gradient, one client with a chosen batch, a
DP-SGD step at a given noise level), this module runs the *client side* of one
round itself and hands the updates to a registered aggregator through the
in-process transport, so the view is exactly what that protocol's server would
hold:

* :func:`full_spec` / :func:`lora_model`: what trains (and so what is sent);
* :func:`fedsgd_update`: the scaled gradient a FedSGD client uploads;
* :func:`sgd_update`: ``Δ = θ_after − θ_before`` after local SGD steps, with
  the float32 rounding of the weights that a weight-delta upload carries;
* :func:`dp_sgd_update`: one DP-SGD step: per-example gradients clipped to
  ``clip`` (L2 over every trainable tensor), summed, Gaussian noise
  ``N(0, (σ·clip)²)`` from a :class:`~securefed.protocols.csprng.KeyStream`
  (a CSPRNG, never NumPy), averaged (Abadi et al. 2016);
  :func:`clipped_gradient_sum` is the plain per-example loop (the reference),
  :func:`fast_clipped_gradient_sum` the same sum from one batched
  forward/backward per chunk of examples (per-example norms from hooks and
  Gram matrices, :mod:`securefed.attacks.per_example`);
* :func:`observe`: run the aggregator; returns the server's observation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.peft.spec import AdapterSpec
from securefed.protocols.base import AGGREGATORS, ClientInput, ServerObservation
from securefed.protocols.csprng import KeyStream

from .per_example import BatchLossFn, PerExampleGradients
from .target import decoder_layers

LossFn = Callable[[nn.Module], torch.Tensor]


def _grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def full_spec(model: nn.Module, *, layers: int | None = None) -> tuple[AdapterSpec, dict[str, nn.Parameter]]:
    """Full fine-tuning: every parameter, or only those of the first ``layers`` decoder layers.

    Restricting the *recorded* spec to the layers an attack reads keeps views
    small; the client still trains (and clips) every parameter.
    """
    params = dict(model.named_parameters())
    if layers is not None:
        n_layers = len(decoder_layers(model))
        marks = tuple(f".layers.{i}." for i in range(min(layers, n_layers)))
        params = {n: p for n, p in params.items() if any(m in f".{n}" for m in marks)}
    return AdapterSpec.from_state("full", params), params


def lora_model(model: nn.Module, *, r: int, alpha: float, targets: Sequence[str] = ("q_proj", "v_proj"),
               b_std: float = 0.0, seed: int = 0) -> tuple[nn.Module, AdapterSpec, dict[str, nn.Parameter]]:
    """Attach LoRA through ``peft`` (as :class:`securefed.peft.registry.LoraMethod` does).

    ``b_std > 0`` draws B from N(0, b_std²) instead of peft's zeros, standing in
    for a global adapter after some rounds (at B = 0 the A-gradients vanish).
    """
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))  # type: ignore[arg-type]
        wrapped = get_peft_model(model, cfg)
        if b_std > 0:
            with torch.no_grad():
                for n, p in wrapped.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, b_std)
    params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    return wrapped, AdapterSpec.from_state("lora", params), params


def _snapshot(spec: AdapterSpec, params: Mapping[str, nn.Parameter]) -> np.ndarray:
    return spec.flatten({n: params[n].detach() for n in spec.names})


def fedsgd_update(spec: AdapterSpec, params: Mapping[str, nn.Parameter], model: nn.Module, loss_fn: LossFn,
                  *, lr: float) -> np.ndarray:
    """FedSGD (McMahan et al. 2017): the client uploads its gradient, scaled by ``-lr``.

    Unlike :func:`sgd_update` no float32 weight is rounded on the way, so the
    upload carries the gradient to float32 precision.
    """
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    grads = {n: _grad(params[n]) for n in spec.names}
    model.zero_grad(set_to_none=True)
    return (-lr * spec.flatten(grads).astype(np.float64)).astype(np.float32)


def sgd_update(model: nn.Module, spec: AdapterSpec, params: Mapping[str, nn.Parameter], losses: Sequence[LossFn],
               *, lr: float) -> np.ndarray:
    """Run one plain SGD step per loss in ``losses`` (FedSGD: one; FedAvg: several); return Δ.

    The model is restored to its starting weights afterwards.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    before = _snapshot(spec, params)
    for loss_fn in losses:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        with torch.no_grad():
            for p in trainable:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
    after = _snapshot(spec, params)
    with torch.no_grad():
        for p, s in zip(trainable, start, strict=True):
            p.copy_(s)
    model.zero_grad(set_to_none=True)
    return (after - before).astype(np.float32)


def clipped_gradient_sum(model: nn.Module, spec: AdapterSpec, params: Mapping[str, nn.Parameter],
                         per_example: Sequence[LossFn], *, clip: float) -> tuple[np.ndarray, dict[str, float]]:
    """Sum over examples of each gradient clipped to L2 norm ``clip`` (the norm over *every*
    trainable tensor, as Opacus' flat clipping); only the spec's coordinates are returned.

    The straightforward loop, one backward per example: the reference that
    :func:`fast_clipped_gradient_sum` is tested against.
    """
    if clip <= 0:
        raise ValueError("clip must be > 0")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = np.zeros(spec.dim, dtype=np.float64)
    clipped = 0
    for loss_fn in per_example:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in trainable.values() if p.grad is not None)
        norm = sq**0.5
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped += int(factor < 1.0)
        grads = {n: _grad(params[n]) for n in spec.names}
        total += factor * spec.flatten(grads, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    return total, {"clipped_fraction": clipped / max(1, len(per_example))}


def fast_clipped_gradient_sum(model: nn.Module, spec: AdapterSpec, params: Mapping[str, nn.Parameter],
                              batches: Sequence[BatchLossFn], *, clip: float) -> tuple[np.ndarray, dict[str, float]]:
    """:func:`clipped_gradient_sum` from one batched forward/backward per chunk.

    Each of ``batches`` returns the per-example losses of a chunk of examples
    (a 1-D tensor; the examples must not interact, as with padded causal-LM
    batches). Every trainable tensor's per-example gradient enters the norm
    (exactly as in the loop: the norm is over *every* trainable tensor), but
    only the spec's tensors are formed per example and summed, so the cost of
    a full-model clip is one batched pass plus T x T Gram matrices, not one
    backward per example. Supports linear, embedding (tied or not) and
    elementwise-scale (RMSNorm/LayerNorm) modules; raises
    ``NotImplementedError`` for any other module that owns a trainable tensor.
    """
    if clip <= 0:
        raise ValueError("clip must be > 0")
    keep = {n: params[n] for n in spec.names}
    sampler = PerExampleGradients(model, keep)
    totals = {n: torch.zeros(tuple(p.shape), dtype=torch.float64) for n, p in keep.items()}
    clipped = 0
    count = 0
    for loss_fn in batches:
        sq, kept = sampler.run(loss_fn)
        for i in range(sq.shape[0]):
            norm = float(sq[i]) ** 0.5
            factor = min(1.0, clip / norm) if norm > 0 else 1.0
            clipped += int(factor < 1.0)
            for n, p in keep.items():
                if id(p) in kept:
                    totals[n] += factor * kept[id(p)][i].double()
        count += int(sq.shape[0])
    model.zero_grad(set_to_none=True)
    return spec.flatten(totals, dtype=torch.float64), {"clipped_fraction": clipped / max(1, count)}


def dp_noised_update(clipped_sum: np.ndarray, n: int, *, lr: float, clip: float, noise_multiplier: float,
                     stream: KeyStream | None = None) -> np.ndarray:
    """``-lr x (clipped sum + N(0, (σ·clip)² I)) / n``, the noise from a CSPRNG keystream."""
    if noise_multiplier < 0 or n < 1:
        raise ValueError("noise_multiplier must be >= 0 and n >= 1")
    noise = (stream or KeyStream.fresh()).standard_normal(clipped_sum.shape[0]) * (noise_multiplier * clip)
    return (-lr * (clipped_sum + noise) / n).astype(np.float32)


def dp_sgd_update(model: nn.Module, spec: AdapterSpec, params: Mapping[str, nn.Parameter],
                  per_example: Sequence[LossFn], *, lr: float, clip: float, noise_multiplier: float,
                  stream: KeyStream | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """One DP-SGD step (Abadi et al. 2016): clip each example's gradient, add noise, average."""
    total, stats = clipped_gradient_sum(model, spec, params, per_example, clip=clip)
    vec = dp_noised_update(total, len(per_example), lr=lr, clip=clip, noise_multiplier=noise_multiplier, stream=stream)
    return vec, stats


def observe(updates: Mapping[int, np.ndarray], *, aggregator: str = "plaintext",
            weights: Mapping[int, float] | None = None, options: Mapping[str, Any] | None = None) -> ServerObservation:
    """Run one round of a registered aggregator over ``updates``; the server's observation."""
    from securefed.fl.transport import run_round

    agg = AGGREGATORS.create(aggregator, **dict(options or {}))
    inputs = {c: ClientInput(np.asarray(v, dtype=np.float32), float((weights or {}).get(c, 1.0))) for c, v in updates.items()}
    outcome = run_round(agg.new_round(0, inputs), agg.stages)
    return outcome.observation


# -- tiny, self-contained models for tests and examples --------------------------------------------

def word_tokenizer(words: Sequence[str]) -> Any:
    """A whitespace word-level tokenizer over ``words`` (+ ``[PAD]``, ``[UNK]``, ``[EOS]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, tied: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A random-init Llama with the shape of the ``tiny-llama`` asset (hidden 64, 2 layers, GQA 4/2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return nn.Module.to(model, dtype).eval()


def encode(tokenizer: Any, texts: Sequence[str], *, append_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (EOS appended: the last input gets no gradient)."""
    seqs = [list(tokenizer.encode(t, add_special_tokens=False)) + ([tokenizer.eos_token_id] if append_eos else []) for t in texts]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask


def causal_lm_loss(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LossFn:
    """Per-example mean next-token NLL, averaged over the batch (the loop's causal-LM loss)."""

    def loss(model: nn.Module) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        tgt = input_ids[:, 1:]
        keep = attention_mask[:, 1:].to(logits.dtype)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        return ((nll * keep).sum(1) / keep.sum(1).clamp_min(1.0)).mean()

    return loss


def seq_cls_loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> LossFn:
    """Cross-entropy of a sequence-classification head, averaged over the batch."""

    def loss(model: nn.Module) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.nn.functional.cross_entropy(logits, labels)

    return loss
