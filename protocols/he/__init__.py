"""Homomorphic aggregation with TenSEAL: the ``ckks`` and ``bfv`` aggregators.

Clients encrypt their update, the server adds ciphertexts holding no secret
key, and only the aggregate is ever decrypted, by a client (``client-held``
keys: the server sees no plaintext at all) or by a separate key authority
(``key-authority``: no client holds the key). Parameters are chosen for
addition only (one data prime), which costs 32 bytes per parameter for CKKS
and 16 for BFV instead of NVFlare's 57.6. See ``docs/homomorphic-aggregation.md``.

Modules: :mod:`.params` (parameter choice, precision and noise bounds),
:mod:`.keys` (roles, key generation, the sealed secret-key hand-over),
:mod:`.codec` (chunked ciphertexts, strict loading), :mod:`.messages` (wire
format), :mod:`.parallel` (multi-process encryption), :mod:`.client`,
:mod:`.server`, :mod:`.authority` (the parties), :mod:`.aggregator`
(options, rounds, registration).
"""

from __future__ import annotations

from .aggregator import BFVAggregator, CKKSAggregator, HEAggregator, HERound, build_settings
from .errors import BelowMinClientsError, ParameterMismatchError, SecretKeyExposureError
from .params import HEParams, select_bfv, select_ckks, select_params

__all__ = [
    "BFVAggregator",
    "BelowMinClientsError",
    "CKKSAggregator",
    "HEAggregator",
    "HEParams",
    "HERound",
    "ParameterMismatchError",
    "SecretKeyExposureError",
    "build_settings",
    "select_bfv",
    "select_ckks",
    "select_params",
]
