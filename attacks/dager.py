"""DAGER: exact gradient inversion for decoder LMs (Petrov et al., NeurIPS 2024).

Threat model: an honest-but-curious server that holds a client's update (or a
sum of updates) and the public model; no data prior. It uses only linear
algebra on the update (attacks-and-auditing.md §1.7, §1.9, §1.10).

1. **Token filter** (first layer). The q/k/v weight gradients of layer 0 span
   exactly the layer's inputs ``RMSNorm(E[t])`` of the batch's distinct tokens;
   with RoPE that input does not depend on the position, so one pass over the
   vocabulary finds every token of the batch (:class:`~.span.SpanBasis`).
2. **Sequence growth**. Starting from the empty prefix, every surviving prefix
   is extended by every candidate token; the new position's inputs to the
   next gradient-carrying layers are computed (:mod:`.llama`) and kept only if
   they lie in those layers' gradient row spans: layer 0's gate/up input
   (cheap, tested first for every pair in float32), its down-projection input,
   and layer 1's q/k/v input (DAGER's layer-2 test), all re-checked in float64.
   A prefix no candidate extends is a finished sequence.
3. **FedAvg** (several local steps): the update is a sum of gradients at
   drifting weights; ``-Δ/(lr·steps)`` is used as the gradient, the spans hold
   approximately, and thresholds are relaxed (5e-3, as DAGER's FedAvg mode).
4. **LoRA**: ``∇A`` rows lie in the span of the layer's inputs but its rank is
   at most r, so the test is exact only while a layer sees at most r distinct
   inputs (r tokens for the token filter, r positions for sequence growth;
   q and v adapters together give up to 2r); beyond that the span is a random
   r-dimensional slice and true tokens fall outside it. When the global ``A``
   is known (every round; frozen in FFA-LoRA), ``∇B`` gives a projected test
   ``A·x ∈ rowspace(∇B)`` in ℝʳ, capped the same way. At the first round
   ``B = 0`` makes ``∇A = 0``, so only the ``∇B`` test carries information.

Limits: a span test separates inputs only while they number fewer than the
dimension (hidden size 576 for SmolLM2) minus a margin (``rank_cutoff``); a
sum over many clients adds their tokens, which is what secure aggregation buys
(§2.4). Gaussian DP noise makes every gradient full rank, so the hard
thresholds stop separating anything; the attack reports that instead of
guessing. Under causal-LM training the last input token of a sequence gets
no gradient and cannot be recovered by the span tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import AttackConfigError
from .llama import Candidates, LlamaFirstLayer, Prefixes
from .registry import Attack, AttackContext, register
from .results import Diagnostic, Reconstruction, Status, reconstruction
from .span import SpanBasis
from .target import TargetModel
from .text import decode_private
from .views import Target

#: Which layer inputs a view's gradients can test, and the modules that read them.
STAGES: dict[str, tuple[int, tuple[str, ...]]] = {
    "attn_in0": (0, ("q_proj", "k_proj", "v_proj")),
    "mlp_in0": (0, ("gate_proj", "up_proj")),
    "down_in0": (0, ("down_proj",)),
    "attn_in1": (1, ("q_proj", "k_proj", "v_proj")),
}


@dataclass(frozen=True)
class DagerOptions:
    """Knobs of :class:`DagerAttack` (``None`` = chosen from the view).

    Attributes:
        token_threshold: span distance below which a vocabulary token is a
            candidate; ``None`` places it at the largest gap of the sorted distances.
        span_threshold: the largest span distance at which a new position can be
            accepted; below it each step places its threshold at the jump between
            the true group and the rest (:func:`gap_threshold`). ``None``: 1e-3 for
            one local SGD step, 2e-2 for FedAvg updates.
        prefilter_factor: the float32 pre-test (every prefix x every candidate)
            passes ``factor x span_threshold`` on to the float64 re-check.
        max_length: longest sequence searched (``None``: the announced max_length, else 256).
        max_prefixes: beam cap; prefixes beyond it are dropped (reported).
        max_candidates: cap on candidate tokens (reported).
        rank_cutoff: a span within this many dimensions of the space is uninformative.
        min_gap: least singular-value drop (decades) that ends a rank.
    """

    token_threshold: float | None = None
    span_threshold: float | None = None
    prefilter_factor: float = 3.0
    max_length: int | None = None
    max_prefixes: int = 512
    max_candidates: int = 4000
    rank_cutoff: int = 20
    min_gap: float = 1.5

    def __post_init__(self) -> None:
        for key in ("token_threshold", "span_threshold"):
            v = getattr(self, key)
            if v is not None and not 0 < v < 1:
                raise AttackConfigError(f"must be in (0, 1), got {v}", key=f"attack.{key}")
        if self.prefilter_factor < 1:
            raise AttackConfigError(f"must be >= 1, got {self.prefilter_factor}", key="attack.prefilter_factor")
        for key in ("max_prefixes", "max_candidates"):
            if getattr(self, key) < 1:
                raise AttackConfigError(f"must be >= 1, got {getattr(self, key)}", key=f"attack.{key}")
        if self.max_length is not None and self.max_length < 1:
            raise AttackConfigError(f"must be >= 1, got {self.max_length}", key="attack.max_length")
        if self.rank_cutoff < 0 or self.min_gap <= 0:
            raise AttackConfigError("rank_cutoff must be >= 0 and min_gap > 0", key="attack.rank_cutoff")


@dataclass(frozen=True)
class Probe:
    """One span test on one layer input: ``transform`` maps the input first (LoRA-B: the global A)."""

    name: str
    stage: str
    span: SpanBasis
    transform: torch.Tensor | None = None

    def distance(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        y = x.to(dtype)
        if self.transform is not None:
            y = y @ self.transform.to(dtype).T
        return self.span.distance(y, dtype=dtype)

    @property
    def informative(self) -> bool:
        """A span that fills the space accepts everything; a saturated one (rank = rows
        stacked, no drop) is a slice of the inputs' span that true inputs fall outside:
        neither can certify an input, so neither is used."""
        return self.span.rank > 0 and not self.span.full and not self.span.saturated


@dataclass
class _Log:
    notes: list[str] = field(default_factory=list)
    diag: dict[str, Diagnostic] = field(default_factory=dict)


def build_probes(
    tm: TargetModel, grads: dict[str, torch.Tensor], opts: DagerOptions, log: _Log, stages: tuple[str, ...] = tuple(STAGES)
) -> dict[str, list[Probe]]:
    """Span tests the view's gradients support, per layer input (see :data:`STAGES`)."""
    out: dict[str, list[Probe]] = {}
    # FedAvg: gradients at drifting weights add weak directions; keep all above the noise floor.
    floor = 10.0 if tm.public.local_steps > 1 else None
    for stage in stages:
        layer, modules = STAGES[stage]
        rows = []
        names = []
        for mod in modules:
            for part in ("weight", "lora_A"):
                g = tm.find(grads, layer, mod, part)
                if g is not None and g.ndim == 2:
                    rows.append(g)
                    names.append(f"{mod}.{part}")
        probes: list[Probe] = []
        if rows:
            dim = rows[0].shape[1]
            span = SpanBasis.from_rows(
                rows, cutoff=min(opts.rank_cutoff, max(1, dim // 8)), min_gap=opts.min_gap, floor_factor=floor
            )
            probes.append(Probe(f"L{layer} " + "+".join(names), stage, span))
        for mod in modules:
            gb = tm.find(grads, layer, mod, "lora_B")
            a = tm.global_tensor(layer, mod, "lora_A")
            if gb is None or a is None:
                continue
            if float(a.abs().max()) == 0.0:
                continue
            span = SpanBasis.from_rows(
                [gb], cutoff=max(1, min(opts.rank_cutoff, gb.shape[1] // 8)), min_gap=opts.min_gap, floor_factor=floor
            )
            probes.append(Probe(f"L{layer} {mod}.lora_B (projected by global A)", stage, span, a))
        for p in probes:
            log.diag[f"rank[{p.name}]"] = p.span.rank
            if p.span.saturated:
                log.notes.append(
                    f"{p.name}: rank {p.span.rank} equals the {min(p.span.rows, p.span.dim)} rows available "
                    "(no drop): the layer may see more distinct inputs than the gradient can carry; not used"
                )
            if p.span.full:
                log.notes.append(
                    f"{p.name}: rank {p.span.rank} of {p.span.dim}: the span fills the space, so it separates nothing "
                    "(more token positions than the layer width)"
                )
        if probes:
            out[stage] = probes
    return out


def _closest(probes: list[Probe], x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Distance of each row of ``x`` to the *closest* informative span of one layer input.

    Within one input the spans are alternatives: each holds only the positions
    whose gradient reached that module (a query at position 0 attends to itself
    alone, so ``q_proj`` never sees it), and being inside any of them is the
    evidence. Across inputs the tests are combined with ``max`` (all must hold).
    """
    best = torch.full(x.shape[:-1], float("inf"), dtype=dtype)
    for p in probes:
        if p.informative:
            best = torch.minimum(best, p.distance(x, dtype=dtype))
    return best


def gap_threshold(distances: torch.Tensor, cap: float, *, min_gap: float = 1.5) -> float:
    """Where the sorted distances jump by at least ``min_gap`` decades below ``cap``; else ``cap``.

    True inputs sit at the round-off of the gradient (1e-7 to 1e-5 for a float32
    FedSGD upload), wrong ones at 1e-3 and above; the jump between the two groups
    is the threshold. Without a jump (all true, or all wrong) the fixed ``cap``
    decides.
    """
    d = torch.sort(distances.flatten().to(torch.float64))[0]
    d = d[torch.isfinite(d)]
    if d.numel() < 2:
        return cap
    lo, hi = d[:-1].clamp_min(1e-300), d[1:].clamp_min(1e-300)
    gaps = torch.where(lo < cap, torch.log10(hi / lo), torch.zeros_like(lo))
    j = int(torch.argmax(gaps))
    if float(gaps[j]) < min_gap:
        return cap
    return min(cap, float((lo[j] * hi[j]).sqrt()))


def token_candidates(
    ev: LlamaFirstLayer, probes: list[Probe], opts: DagerOptions, log: _Log
) -> torch.Tensor:
    """Vocabulary tokens whose first-layer input lies in every first-layer span (sorted by distance)."""
    useful = [p for p in probes if p.informative]
    x32 = ev.token_inputs().to(torch.float32)
    worst32 = torch.full((x32.shape[0],), float("inf"), dtype=torch.float32)
    for p in useful:
        worst32 = torch.minimum(worst32, p.distance(x32, dtype=torch.float32))
    rank = max(p.span.rank for p in useful)
    k = min(x32.shape[0], max(4 * rank + 64, 256))
    order = torch.argsort(worst32)[:k]
    x = ev.token_inputs(order)
    worst = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    for p in useful:
        worst = torch.minimum(worst, p.distance(x))
    srt, idx = torch.sort(worst)
    order = order[idx]
    if opts.token_threshold is not None:
        thr = opts.token_threshold
    else:
        thr = gap_threshold(srt, 0.1, min_gap=1.0)
        if thr == 0.1:
            thr = 1e-3
            log.notes.append("token distances show no clear gap: used the fixed threshold 1e-3")
    keep = order[srt < thr]
    log.diag["token_threshold"] = thr
    log.diag["token_candidates"] = int(keep.numel())
    if keep.numel() > opts.max_candidates:
        log.notes.append(f"{keep.numel()} candidate tokens: kept the {opts.max_candidates} closest (max_candidates)")
        keep = keep[: opts.max_candidates]
    return keep


def grow_sequences(
    ev: LlamaFirstLayer,
    cand: Candidates,
    seq_probes: dict[str, list[Probe]],
    *,
    threshold: float,
    prefilter: float,
    max_length: int,
    max_prefixes: int,
    log: _Log,
) -> tuple[list[tuple[int, ...]], list[bool]]:
    """DAGER's greedy growth; returns the finished sequences and whether each is complete."""
    mlp_probes = [p for p in seq_probes.get("mlp_in0", []) if p.informative]
    late = {
        s: [p for p in seq_probes[s] if p.informative]
        for s in ("down_in0", "attn_in1")
        if any(p.informative for p in seq_probes.get(s, []))
    }
    prefixes: Prefixes = ev.empty()
    finished: list[tuple[int, ...]] = []
    complete: list[bool] = []
    most = 0
    pruned = 0
    thresholds: list[float] = []
    for _ in range(max_length):
        if not len(prefixes):
            break
        h32 = ev.residual_mid(prefixes, cand, dtype=torch.float32)  # P, C, hidden
        x32 = ev.mlp_input(h32)
        f32 = torch.float32
        if mlp_probes:
            worst = _closest(mlp_probes, x32, dtype=f32)
        else:
            a32 = ev.mlp_hidden(x32)
            worst = torch.zeros(h32.shape[:2], dtype=f32)
            for stage, probes in late.items():
                inp = a32 if stage == "down_in0" else ev.layer1_input(h32, a32)
                worst = torch.maximum(worst, _closest(probes, inp, dtype=f32))
        p_idx, c_idx = torch.nonzero(worst < prefilter, as_tuple=True)
        if p_idx.numel():
            h = ev.residual_mid_pairs(prefixes, cand, p_idx, c_idx)
            x = ev.mlp_input(h)
            dist = _closest(mlp_probes, x) if mlp_probes else torch.zeros(h.shape[0], dtype=torch.float64)
            if late:
                a = ev.mlp_hidden(x)
                for stage, probes in late.items():
                    inp = a if stage == "down_in0" else ev.layer1_input(h, a)
                    dist = torch.maximum(dist, _closest(probes, inp))
            step_thr = gap_threshold(dist, threshold)
            thresholds.append(step_thr)
            ok = dist < step_thr
            # A run of one repeated token from the start leaves every attention
            # value equal, so layer 0 cannot tell its length: refuse to extend it.
            for j in torch.nonzero(ok).flatten().tolist():
                toks = prefixes.tokens[int(p_idx[j])]
                if toks and all(t == int(cand.ids[int(c_idx[j])]) for t in toks):
                    ok[j] = False
            p_idx, c_idx, dist = p_idx[ok], c_idx[ok], dist[ok]
        extended = set(p_idx.tolist())
        for j, toks in enumerate(prefixes.tokens):
            if j not in extended and toks:
                finished.append(toks)
                complete.append(True)
        if p_idx.numel() > max_prefixes:
            best = torch.argsort(dist)[:max_prefixes]
            pruned += int(p_idx.numel()) - max_prefixes
            p_idx, c_idx = p_idx[best], c_idx[best]
        most = max(most, int(p_idx.numel()))
        prefixes = ev.extend(prefixes, cand, p_idx, c_idx) if p_idx.numel() else Prefixes([], prefixes.keys[:0], prefixes.values_out[:0])
    for toks in prefixes.tokens:
        finished.append(toks)
        complete.append(False)
    if len(prefixes):
        log.notes.append(f"{len(prefixes)} sequences still growing at max_length={max_length}: reported as incomplete")
    if pruned:
        log.notes.append(f"beam cap max_prefixes reached: {pruned} extensions dropped")
    log.diag["max_live_prefixes"] = most
    if thresholds:
        log.diag["step_threshold_max"] = max(thresholds)
    return finished, complete


@register
class DagerAttack(Attack):
    """DAGER (Petrov, Dimitrov, Baader, Müller, Vechev; NeurIPS 2024), on full, FedAvg and LoRA updates."""

    name = "dager"
    citation = "Petrov et al., DAGER: Exact Gradient Inversion for Large Language Models, NeurIPS 2024"
    threat_model = "honest-but-curious server; one update or a sum of updates; public model; no data prior"
    Options = DagerOptions

    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        opts: DagerOptions = self.options
        public = ctx.view.public
        log = _Log()
        if public.peft_method not in ("full", "lora"):
            return reconstruction(target, "not-applicable",
                notes=(f"DAGER reads linear-layer weight or LoRA gradients; PEFT method {public.peft_method!r} has none",),
            )
        t0 = time.perf_counter()
        tm = ctx.model()
        ev = LlamaFirstLayer(tm.model)
        log.diag["seconds_model"] = time.perf_counter() - t0
        if public.local_optimizer.lower() not in ("sgd", "fedsgd"):
            log.notes.append(
                f"local optimizer {public.local_optimizer!r} rescales each coordinate: the update is no longer a sum "
                "of gradients, so its row spaces need not match the inputs"
            )
        grads = tm.gradients(target.vector)
        t0 = time.perf_counter()
        probes = build_probes(tm, grads, opts, log, ("attn_in0", "mlp_in0", "attn_in1"))
        if not any(p.informative for s in ("mlp_in0", "attn_in1") for p in probes.get(s, [])):
            # The down projection's input is 1536-wide (SmolLM2): it still separates
            # positions when the 576-wide spans are full. Only built when needed.
            probes.update(build_probes(tm, grads, opts, log, ("down_in0",)))
        log.diag["seconds_spans"] = time.perf_counter() - t0
        first = [p for p in probes.get("attn_in0", []) if p.informative]
        if not first:
            why = (
                "the view has no first-layer q/k/v gradient (weights or LoRA)"
                if "attn_in0" not in probes
                else "the first-layer gradient span is empty, fills the space, or is saturated: the batch has more "
                "distinct tokens than the width (or, for LoRA, than the 2r rows of the A-gradients) can separate"
            )
            return reconstruction(target, "unresolvable" if "attn_in0" in probes else "not-applicable",
                                  notes=(why, *log.notes), diagnostics=log.diag)
        t0 = time.perf_counter()
        ids = token_candidates(ev, first, opts, log)
        log.diag["seconds_tokens"] = time.perf_counter() - t0
        if ids.numel() == 0:
            return reconstruction(target, "unresolvable", notes=("no vocabulary token lies in the first-layer span", *log.notes), diagnostics=log.diag)
        seq_probes = {s: ps for s, ps in probes.items() if s != "attn_in0" and any(p.informative for p in ps)}
        bag = tuple(int(t) for t in ids)
        if not seq_probes:
            log.notes.append("no informative later-layer span: token order cannot be tested; returning the bag of tokens")
            return reconstruction(target, "partial", tokens=bag, notes=tuple(log.notes), diagnostics=log.diag)
        multi = public.local_steps > 1
        thr = opts.span_threshold or (2e-2 if multi else 1e-3)
        pre = thr * opts.prefilter_factor
        max_len = opts.max_length or public.max_length or 256
        t0 = time.perf_counter()
        cand = ev.candidates(ids)
        seqs, complete = grow_sequences(
            ev, cand, seq_probes, threshold=thr, prefilter=pre, max_length=max_len,
            max_prefixes=opts.max_prefixes, log=log,
        )
        log.diag["seconds_growth"] = time.perf_counter() - t0
        log.diag.update({"span_threshold": thr, "sequences": len(seqs)})
        texts = tuple(decode_private(tm.tokenizer, s, public.text_template) for s in seqs)
        status: Status = "recovered" if seqs and all(complete) else ("partial" if seqs else "unresolvable")
        return reconstruction(target, status, sequences=tuple(seqs), texts=texts, exact=tuple(complete), tokens=bag,
            notes=tuple(log.notes), diagnostics=log.diag,
        )
