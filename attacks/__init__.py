"""Attack evaluation, importable as ``securefed.attacks``.

Attacks accept only a :class:`ServerView`: what an honest-but-curious server
holds after a round under the configured protocol, plus declared public
knowledge and auxiliary data. Importing this package registers the built-in
attacks in :data:`ATTACKS`:

* ``dager``: exact recovery for decoder LMs from span tests (Petrov et al. 2024);
* ``bag-of-tokens``, ``lm-head-labels``, ``linear-inversion``: analytic primitives;
* ``tag``, ``lamp``: optimization-based gradient matching (Deng et al. 2021;
  Balunović et al. 2022).

See docs/attacks.md for threat models, assumptions and limits.
"""

from __future__ import annotations

from . import analytic as _analytic  # noqa: F401  (registers the analytic attacks)
from . import dager as _dager  # noqa: F401  (registers "dager")
from . import optimization as _optimization  # noqa: F401  (registers "tag", "lamp")
from .errors import (
    AttackConfigError,
    AttackError,
    NotAServerViewError,
    UnsupportedModelError,
    ViewFormatError,
    ViewMismatchError,
)
from .metrics import TextScores, score_bag, score_texts
from .registry import ATTACKS, Attack, AttackContext, AttackRegistry
from .results import AttackResult, Reconstruction
from .runner import run_attack
from .store import load_truth, load_views, save_views
from .views import AuxiliaryData, EvaluationTruth, PublicKnowledge, ServerView, Target, ViewKind

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfigError",
    "AttackContext",
    "AttackError",
    "AttackRegistry",
    "AttackResult",
    "AuxiliaryData",
    "EvaluationTruth",
    "NotAServerViewError",
    "PublicKnowledge",
    "Reconstruction",
    "ServerView",
    "Target",
    "TextScores",
    "UnsupportedModelError",
    "ViewFormatError",
    "ViewKind",
    "ViewMismatchError",
    "load_truth",
    "load_views",
    "run_attack",
    "save_views",
    "score_bag",
    "score_texts",
]
