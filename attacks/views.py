"""Threat-model types: what an honest-but-curious server holds after a round.

A :class:`ServerView` is built from the aggregation protocol's
:class:`~securefed.protocols.base.ServerObservation` plus the
:class:`PublicKnowledge` every participant has (the global model and adapter,
the training hyper-parameters the server announced). It is the *only* input an
attack accepts, together with declared :class:`AuxiliaryData` (a prior model, a
public corpus). What a client holds privately (its texts, its local model, its
optimizer state) has no place in these types; the experimenter's record of the
clients' texts is an :class:`EvaluationTruth`, which attacks refuse and only the
metrics read.

What the server holds depends on the protocol (attacks-and-auditing.md §2.4):

* ``individual`` (plaintext): every client's update, in the clear;
* ``masked`` (SecAgg/SecAgg+): masked vectors, uniformly random on their own,
  and the unmasked sum;
* ``ciphertext`` (HE): ciphertexts; the sum only if the server may decrypt;
* ``aggregate``: only a (possibly DP-noised) sum.

Everything is immutable: arrays are read-only copies, mappings are read-only
proxies, so an attack cannot alter the record it was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np

from securefed.peft.spec import AdapterSpec
from securefed.protocols.base import ServerObservation

from .errors import ViewMismatchError

JsonScalar = str | int | float | bool | None


class ViewKind(StrEnum):
    """Which of the protocol's outputs the server can read."""

    INDIVIDUAL = "individual"
    MASKED = "masked"
    CIPHERTEXT = "ciphertext"
    AGGREGATE = "aggregate"


def _frozen_array(a: np.ndarray, *, dtype: Any = None) -> np.ndarray:
    out = np.array(a, dtype=dtype if dtype is not None else a.dtype, copy=True)
    out.setflags(write=False)
    return out


def _frozen_vectors(m: Mapping[int, np.ndarray] | None) -> Mapping[int, np.ndarray] | None:
    if m is None:
        return None
    return MappingProxyType({int(k): _frozen_array(np.asarray(v)) for k, v in sorted(m.items())})


@dataclass(frozen=True)
class PublicKnowledge:
    """What every participant (and so the server) knows about a round.

    Attributes:
        model_name: the public base model (a :func:`securefed.assets.models.load_model` name).
        spec: the adapter spec: which tensors the update vector holds. For full
            fine-tuning (``peft_method="full"``) it lists base-model parameter names.
        global_vector: the global adapter (or parameter) vector at the start of
            the round, i.e. what the server broadcast.
        peft_method: ``"lora"``, ``"full"``, ... (the PEFT registry name).
        peft_config: the method's public options (LoRA: ``r``, ``alpha``, ``target_modules``).
        round_index: the round this view belongs to.
        learning_rate, local_steps, local_optimizer: the announced local training
            recipe; an update is ``-learning_rate * sum of gradients`` for SGD.
        batch_size: the local batch size, if announced.
        task: ``"causal-lm"`` or ``"seq-cls"`` (which head the model has).
        num_labels: classes of a ``seq-cls`` head.
        model_seed: the seed that initialised random-init parts (tiny models, new heads).
        max_length: the tokenization length cap, if announced.
        text_template: a public prompt template around the private text (``"{text}"``
            marks the private part), e.g. ``"Review: {text}\\nSentiment:"``.
        sampling: how clients were sampled, in words; ``clients_per_round`` / ``sampling_rate``.
        dp_noise_multiplier, dp_clip, dp_level: the announced DP recipe (``"sample"`` for
            DP-SGD inside clients, ``"user"`` for clipped-and-noised updates), if any.
    """

    model_name: str
    spec: AdapterSpec
    global_vector: np.ndarray
    peft_method: str
    round_index: int
    learning_rate: float
    local_steps: int = 1
    local_optimizer: str = "sgd"
    peft_config: Mapping[str, JsonScalar | tuple[str, ...]] = field(default_factory=dict)
    batch_size: int | None = None
    task: str = "causal-lm"
    num_labels: int = 2
    model_seed: int = 0
    max_length: int | None = None
    text_template: str | None = None
    sampling: str = ""
    clients_per_round: int | None = None
    sampling_rate: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clip: float | None = None
    dp_level: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, AdapterSpec):
            raise ViewMismatchError("PublicKnowledge.spec must be an AdapterSpec")
        g = np.asarray(self.global_vector)
        if g.ndim != 1 or g.shape[0] != self.spec.dim:
            raise ViewMismatchError(
                f"global_vector has shape {g.shape}, the adapter spec describes {self.spec.dim} entries"
            )
        if not np.isfinite(g).all():
            raise ViewMismatchError("global_vector has NaN/Inf entries")
        object.__setattr__(self, "global_vector", _frozen_array(g, dtype=np.float32))
        object.__setattr__(self, "peft_config", MappingProxyType(dict(self.peft_config)))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ViewMismatchError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.local_steps < 1:
            raise ViewMismatchError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ViewMismatchError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.task not in ("causal-lm", "seq-cls"):
            raise ViewMismatchError(f"task must be 'causal-lm' or 'seq-cls', got {self.task!r}")
        if self.text_template is not None and "{text}" not in self.text_template:
            raise ViewMismatchError("text_template must contain '{text}'")


@dataclass(frozen=True)
class AuxiliaryData:
    """Public auxiliary data an attack declares it uses (never a client's data).

    Attributes:
        prior_model: a public language model used as a prior; ``None`` means the
            global model itself (which the server holds anyway).
        public_texts: a public corpus (e.g. for token statistics or initialisation).
    """

    prior_model: str | None = None
    public_texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """One vector an attack tries to invert, as the server holds it.

    ``vector`` is a client's update (plaintext) or the sum of several clients'
    weighted updates (SecAgg, HE with server decryption, central DP).
    """

    label: str
    vector: np.ndarray
    weight: float
    clients: tuple[int, ...]

    @property
    def is_aggregate(self) -> bool:
        return self.label == "aggregate"


@dataclass(frozen=True)
class ServerView:
    """Exactly what an honest-but-curious server holds after one round.

    Build it with :meth:`from_observation`; the loop records one per round when
    ``attack.record = true``.
    """

    public: PublicKnowledge
    protocol: str
    kind: ViewKind
    contributors: tuple[int, ...]
    aggregate: np.ndarray | None
    total_weight: float | None
    individual_updates: Mapping[int, np.ndarray] | None = None
    individual_weights: Mapping[int, float] | None = None
    masked_updates: Mapping[int, np.ndarray] | None = None
    ciphertexts: Mapping[int, bytes] | None = None

    def __post_init__(self) -> None:
        dim = self.public.spec.dim
        if self.aggregate is not None:
            agg = np.asarray(self.aggregate)
            if agg.shape != (dim,):
                raise ViewMismatchError(f"aggregate has shape {agg.shape}, the adapter spec has {dim} entries")
            object.__setattr__(self, "aggregate", _frozen_array(agg))
        vecs = _frozen_vectors(self.individual_updates)
        for cid, v in (vecs or {}).items():
            if v.shape != (dim,):
                raise ViewMismatchError(f"individual_updates[{cid}] has shape {v.shape}, the adapter spec has {dim} entries")
        object.__setattr__(self, "individual_updates", vecs)
        # Masked vectors live in the protocol's encoded domain (fixed point, padding):
        # kept as the server received them, never interpreted as updates.
        object.__setattr__(self, "masked_updates", _frozen_vectors(self.masked_updates))
        if self.individual_weights is not None:
            object.__setattr__(
                self, "individual_weights", MappingProxyType({int(k): float(v) for k, v in self.individual_weights.items()})
            )
        if self.ciphertexts is not None:
            object.__setattr__(self, "ciphertexts", MappingProxyType({int(k): bytes(v) for k, v in self.ciphertexts.items()}))
        object.__setattr__(self, "contributors", tuple(int(c) for c in self.contributors))

    @classmethod
    def from_observation(cls, observation: ServerObservation, public: PublicKnowledge) -> ServerView:
        """Wrap a protocol's observation with the round's public knowledge.

        Raises:
            ViewMismatchError: a vector's length contradicts the adapter spec.
            TypeError: ``observation`` is not a ``ServerObservation``.
        """
        if not isinstance(observation, ServerObservation):
            raise TypeError(f"expected a ServerObservation, got {type(observation).__name__}")
        if observation.individual_updates:
            kind = ViewKind.INDIVIDUAL
        elif observation.masked_updates:
            kind = ViewKind.MASKED
        elif observation.ciphertexts:
            kind = ViewKind.CIPHERTEXT
        else:
            kind = ViewKind.AGGREGATE
        return cls(
            public=public,
            protocol=observation.protocol,
            kind=kind,
            contributors=tuple(observation.contributors),
            aggregate=None if observation.aggregate is None else np.asarray(observation.aggregate),
            total_weight=observation.total_weight,
            individual_updates=observation.individual_updates,
            individual_weights=observation.individual_weights,
            masked_updates=observation.masked_updates,
            ciphertexts=observation.ciphertexts,
        )

    @property
    def round_index(self) -> int:
        return self.public.round_index

    def targets(self, which: str = "all") -> tuple[Target, ...]:
        """The vectors worth inverting: ``"clients"``, ``"aggregate"`` or ``"all"``.

        Masked vectors and ciphertexts are never targets: on their own they are
        uniformly random (masking) or semantically secure (HE).
        """
        if which not in ("all", "clients", "aggregate"):
            raise ValueError(f"targets must be 'all', 'clients' or 'aggregate', got {which!r}")
        out: list[Target] = []
        if which in ("all", "clients") and self.individual_updates:
            weights = self.individual_weights or {}
            for cid, vec in self.individual_updates.items():
                out.append(Target(f"client {cid}", vec, float(weights.get(cid, 1.0)), (cid,)))
        if which in ("all", "aggregate") and self.aggregate is not None:
            tw = self.total_weight if self.total_weight is not None else float(len(self.contributors))
            out.append(Target("aggregate", self.aggregate, float(tw), self.contributors))
        return tuple(out)


@dataclass(frozen=True)
class EvaluationTruth:
    """The texts each client trained on in a round: the experimenter's oracle.

    Held by whoever runs the experiment, never by the server: attacks refuse it
    (they accept only a :class:`ServerView`); only the metrics read it.
    """

    round_index: int
    texts: Mapping[int, tuple[str, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "texts", MappingProxyType({int(k): tuple(str(t) for t in v) for k, v in self.texts.items()})
        )

    def for_clients(self, clients: tuple[int, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for c in clients:
            out.extend(self.texts.get(c, ()))
        return tuple(out)
