"""``AdapterSpec``: the shape of what clients exchange.

Only the *trainable adapter tensors* leave a client, as one flat float32 vector.
The spec lists their names, shapes and dtypes in a fixed order so that the
server and every client (and the attack layer) agree on what each coordinate
means. Base-model weights never appear in a spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from securefed.errors import UpdateError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class AdapterSpec:
    """Ordered names, shapes and dtypes of the trainable adapter tensors."""

    method: str
    tensors: tuple[TensorSpec, ...]

    @property
    def dim(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @classmethod
    def from_state(cls, method: str, state: Mapping[str, torch.Tensor]) -> AdapterSpec:
        return cls(
            method=method,
            tensors=tuple(
                TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
            ),
        )

    def flatten(self, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """Concatenate ``state`` (in spec order) into one vector (float32, the wire format;
        ``dtype=torch.float64`` for sums that must not round on the way, as a DP clipped sum)."""
        missing = [t.name for t in self.tensors if t.name not in state]
        if missing:
            raise UpdateError(f"adapter state lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
        parts = []
        for t in self.tensors:
            v = state[t.name]
            if tuple(v.shape) != t.shape:
                raise UpdateError(f"tensor {t.name} has shape {tuple(v.shape)}, spec says {t.shape}")
            parts.append(v.detach().to(dtype).reshape(-1).cpu())
        return torch.cat(parts).numpy() if parts else torch.zeros(0, dtype=dtype).numpy()

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors (a copy; float32 storage)."""
        self.check(vector)
        out: dict[str, torch.Tensor] = {}
        flat = torch.from_numpy(np.asarray(vector, dtype=np.float32).copy())
        i = 0
        for t in self.tensors:
            out[t.name] = flat[i : i + t.numel].reshape(t.shape).to(getattr(torch, t.dtype))
            i += t.numel
        return out

    def check(self, vector: np.ndarray) -> None:
        """Raise :class:`UpdateError` unless ``vector`` is a finite 1-D vector of length :attr:`dim`."""
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise UpdateError("an adapter update must be a 1-D numpy vector")
        if vector.shape[0] != self.dim:
            raise UpdateError(f"update has {vector.shape[0]} entries, the adapter spec has {self.dim}")
        if not np.isfinite(vector).all():
            raise UpdateError(f"update has {int((~np.isfinite(vector)).sum())} NaN/Inf entries")

    def to_json(self) -> str:
        return json.dumps(
            {"method": self.method, "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors]}
        )

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        d = json.loads(text)
        return cls(d["method"], tuple(TensorSpec(n, tuple(s), dt) for n, s, dt in d["tensors"]))
