"""The first decoder layer of a Llama-family model, evaluated incrementally.

DAGER's sequence search (Petrov et al., NeurIPS 2024) asks, for every
surviving prefix and every candidate next token, what the inputs of the
gradient-carrying linear layers would be at the new position. This module
answers that for Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2) without
running the whole model: with RoPE, the first layer's attention input
``RMSNorm(E[token])`` does not depend on the position, so the candidates' q/k/v
projections are computed once; a prefix keeps its rotated keys and its values
already multiplied by the output projection, so extending P prefixes by C
candidates costs one batched attention (``P·C·heads·i`` scores) and one
weighted sum, plus the MLP only for the pairs that survive the cheaper test.

Three inputs are exposed, one per gradient a view may carry:

* ``attn_in0``: the first layer's q/k/v input (position-free): :meth:`token_inputs`;
* ``mlp_in0``: the first layer's gate/up input ``RMSNorm(h_mid)`` and
  ``down_in0``: its down-projection input ``act(gate)·up``;
* ``attn_in1``: the second layer's q/k/v input ``RMSNorm(h_1)``.

Correctness is checked against the Hugging Face forward pass in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError
from .target import decoder_layers

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class Prefixes:
    """P prefixes of equal length ``i``: their tokens, rotated keys and W_o-projected values."""

    tokens: list[tuple[int, ...]]
    keys: torch.Tensor  # P, n_kv, i, head_dim
    values_out: torch.Tensor  # P, n_heads, i, hidden

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Candidates:
    """C candidate tokens with their position-free first-layer projections."""

    ids: torch.Tensor  # C
    embed: torch.Tensor  # C, hidden
    q: torch.Tensor  # C, n_heads, head_dim (before RoPE)
    k: torch.Tensor  # C, n_kv, head_dim (before RoPE)
    values_out: torch.Tensor  # C, n_heads, hidden

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class LlamaFirstLayer:
    """Layer 0 (and layer 1's input norm) of a Llama-family model, in ``dtype``."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float64) -> None:
        cfg = getattr(model, "config", None)
        mtype = getattr(cfg, "model_type", None)
        if mtype not in SUPPORTED:
            raise UnsupportedModelError(
                f"the layer-wise DAGER path supports RoPE decoders {SUPPORTED}, not {mtype!r}"
            )
        assert cfg is not None
        layers = decoder_layers(model)
        if len(layers) < 2:
            raise UnsupportedModelError("the model needs at least two decoder layers")
        l0: Any = layers[0]
        l1: Any = layers[1]
        self.dtype = dtype
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.hidden = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.n_heads)
        self.group = self.n_heads // self.n_kv
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if getattr(l0.self_attn, "q_norm", None) is not None:
            raise UnsupportedModelError("q/k-normalised attention (Qwen3-style) is not supported yet")

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype)

        def wb(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        emb = model.get_input_embeddings()  # type: ignore[operator]
        assert isinstance(emb, nn.Embedding)
        self.embedding = emb.weight.detach()
        a, m = l0.self_attn, l0.mlp
        self.wq, self.wk, self.wv, self.wo = (w(a.q_proj.weight), w(a.k_proj.weight), w(a.v_proj.weight), w(a.o_proj.weight))
        self.bq, self.bk, self.bv = wb(a.q_proj.bias), wb(a.k_proj.bias), wb(a.v_proj.bias)
        self.bo = wb(a.o_proj.bias)
        self.wg, self.wu, self.wd = w(m.gate_proj.weight), w(m.up_proj.weight), w(m.down_proj.weight)
        self.act: Any = m.act_fn
        self.ln_in = w(l0.input_layernorm.weight)
        self.eps_in = float(l0.input_layernorm.variance_epsilon)
        self.ln_post = w(l0.post_attention_layernorm.weight)
        self.eps_post = float(l0.post_attention_layernorm.variance_epsilon)
        self.ln_in1 = w(l1.input_layernorm.weight)
        self.eps_in1 = float(l1.input_layernorm.variance_epsilon)
        self._rotary: Any = getattr(getattr(model, "model", model), "rotary_emb", None)
        if self._rotary is None:
            raise UnsupportedModelError("the model has no rotary embedding module")
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- position-free token inputs ---------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids].to(self.dtype)

    def token_inputs(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The first layer's q/k/v input for each token (the whole vocabulary by default)."""
        e = self.embedding if ids is None else self.embedding[ids]
        return _rms(e.to(self.dtype), self.ln_in, self.eps_in)

    def candidates(self, ids: torch.Tensor) -> Candidates:
        e = self.embed(ids)
        x = _rms(e, self.ln_in, self.eps_in)
        q = self._lin(x, self.wq, self.bq).view(-1, self.n_heads, self.head_dim)
        k = self._lin(x, self.wk, self.bk).view(-1, self.n_kv, self.head_dim)
        v = self._lin(x, self.wv, self.bv).view(-1, self.n_kv, self.head_dim)
        return Candidates(ids, e, q, k, self._values_out(v))

    def empty(self) -> Prefixes:
        return Prefixes(
            [()],
            torch.zeros(1, self.n_kv, 0, self.head_dim, dtype=self.dtype),
            torch.zeros(1, self.n_heads, 0, self.hidden, dtype=self.dtype),
        )

    # -- one step of growth ---------------------------------------------------------------------
    def rope(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if position not in self._rope_cache:
            dummy = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            cos, sin = self._rotary(dummy, torch.tensor([[position]]))
            self._rope_cache[position] = (cos.reshape(-1).to(torch.float64), sin.reshape(-1).to(torch.float64))
        cos, sin = self._rope_cache[position]
        return cos.to(self.dtype), sin.to(self.dtype)

    def _rotate(self, x: torch.Tensor, position: int, dtype: torch.dtype) -> torch.Tensor:
        cos, sin = self.rope(position)
        cos, sin = cos.to(dtype), sin.to(dtype)
        half = self.head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def residual_mid(self, prefixes: Prefixes, cand: Candidates, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``h_mid[p, c]``: the residual stream after layer 0's attention, for every pair (P, C, hidden)."""
        dt = dtype or self.dtype
        i = prefixes.length
        n_p, n_c = len(prefixes), len(cand)
        q = self._rotate(cand.q.to(dt), i, dt).view(n_c, self.n_kv, self.group, self.head_dim)
        k_self = self._rotate(cand.k.to(dt), i, dt)
        s_self = (q * k_self.unsqueeze(2)).sum(-1).reshape(n_c, self.n_heads) * self.scale
        if i:
            # scores[p, c, head, j] = q[c, head] . key[p, kv(head), j], as one broadcast matmul per kv head
            qg = q.permute(1, 0, 2, 3).reshape(self.n_kv, 1, n_c * self.group, self.head_dim)
            kt = prefixes.keys.to(dt).permute(1, 0, 3, 2)  # n_kv, P, hd, i
            s_pre = (qg @ kt).reshape(self.n_kv, n_p, n_c, self.group, i).permute(1, 2, 0, 3, 4)
            s_pre = s_pre.reshape(n_p, n_c, self.n_heads, i)
            scores = torch.cat([s_pre * self.scale, s_self.expand(n_p, n_c, self.n_heads).unsqueeze(-1)], dim=-1)
        else:
            scores = s_self.expand(n_p, n_c, self.n_heads).unsqueeze(-1)
        att = torch.softmax(scores, dim=-1)
        # own value: out[p, c] = sum_h att[p, c, h, self] * V_out[c, h]
        out = torch.bmm(att[..., i].permute(1, 0, 2), cand.values_out.to(dt)).permute(1, 0, 2)
        if i:
            out = out + torch.bmm(
                att[..., :i].reshape(n_p, n_c, self.n_heads * i),
                prefixes.values_out.to(dt).reshape(n_p, self.n_heads * i, self.hidden),
            )
        if self.bo is not None:
            out = out + self.bo.to(dt)
        return cand.embed.to(dt).unsqueeze(0) + out

    def residual_mid_pairs(
        self, prefixes: Prefixes, cand: Candidates, p_idx: torch.Tensor, c_idx: torch.Tensor, *, chunk: int = 16
    ) -> torch.Tensor:
        """``h_mid`` for selected (prefix, candidate) pairs only, in ``self.dtype`` (N, hidden)."""
        dt = self.dtype
        i = prefixes.length
        out = []
        for lo in range(0, int(p_idx.shape[0]), chunk):
            pi, ci = p_idx[lo : lo + chunk], c_idx[lo : lo + chunk]
            n = int(pi.shape[0])
            q = self._rotate(cand.q[ci].to(dt), i, dt).view(n, self.n_kv, self.group, self.head_dim)
            k_self = self._rotate(cand.k[ci].to(dt), i, dt)
            s_self = (q * k_self.unsqueeze(2)).sum(-1).reshape(n, self.n_heads) * self.scale
            if i:
                s_pre = torch.einsum("ngak,ngjk->ngaj", q, prefixes.keys[pi].to(dt)).reshape(n, self.n_heads, i)
                scores = torch.cat([s_pre * self.scale, s_self.unsqueeze(-1)], dim=-1)
            else:
                scores = s_self.unsqueeze(-1)
            att = torch.softmax(scores, dim=-1)
            o = torch.einsum("nh,nhd->nd", att[..., i], cand.values_out[ci].to(dt))
            if i:
                o = o + torch.einsum("nhj,nhjd->nd", att[..., :i], prefixes.values_out[pi].to(dt))
            if self.bo is not None:
                o = o + self.bo
            out.append(cand.embed[ci].to(dt) + o)
        return torch.cat(out) if out else torch.zeros(0, self.hidden, dtype=dt)

    def mlp_input(self, h_mid: torch.Tensor) -> torch.Tensor:
        return _rms(h_mid, self.ln_post.to(h_mid.dtype), self.eps_post)

    def mlp_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate x)·(up x)``: the down projection's input."""
        return self.act(x @ self.wg.to(x.dtype).T) * (x @ self.wu.to(x.dtype).T)

    def layer1_input(self, h_mid: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        h1 = h_mid + hidden @ self.wd.to(hidden.dtype).T
        return _rms(h1, self.ln_in1.to(h1.dtype), self.eps_in1)

    def extend(self, prefixes: Prefixes, cand: Candidates, p_idx: torch.Tensor, c_idx: torch.Tensor) -> Prefixes:
        """The prefixes ``prefixes[p_idx[j]] + cand[c_idx[j]]`` (keys and values appended)."""
        i = prefixes.length
        k_new = self._rotate(cand.k[c_idx], i, self.dtype).unsqueeze(2)  # N, n_kv, 1, hd
        v_new = cand.values_out[c_idx].unsqueeze(2)  # N, n_heads, 1, hidden
        return Prefixes(
            [prefixes.tokens[int(p)] + (int(cand.ids[int(c)]),) for p, c in zip(p_idx, c_idx, strict=True)],
            torch.cat([prefixes.keys[p_idx], k_new], dim=2),
            torch.cat([prefixes.values_out[p_idx], v_new], dim=2),
        )

    # -- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ w.T
        return y + b if b is not None else y

    def _values_out(self, v: torch.Tensor) -> torch.Tensor:
        """Per head, the value already mapped through that head's block of ``o_proj``."""
        wo = self.wo.view(self.hidden, self.n_heads, self.head_dim)
        v_heads = v[:, torch.arange(self.n_heads) // self.group]  # C, n_heads, hd
        return torch.einsum("chk,dhk->chd", v_heads, wo)
