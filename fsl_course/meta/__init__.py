"""Few-shot learners behind one interface:
``learner.predict(support_x, support_y, query_x) -> logits (n_query, n_way)``.

* :mod:`fsl_course.meta.base`: the :class:`FewShotLearner` interface, the registry of
  learners by name, :func:`save_learner` / :func:`load_learner`.
* :mod:`fsl_course.meta.backbones`: the Conv-4 feature extractor.
* :mod:`fsl_course.meta.baselines`: pixel nearest neighbour, pixel prototype, and
  pretrain-then-fine-tune (Chen et al. 2019).
"""

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import LEARNERS, FewShotLearner, load_learner, register_learner, save_learner, validate_episode
from fsl_course.meta.baselines import (
    PixelNearestNeighbour,
    PixelPrototype,
    PretrainFinetune,
    prototypes,
    pretrain,
    squared_distances,
)

__all__ = [
    "LEARNERS",
    "Conv4",
    "FewShotLearner",
    "PixelNearestNeighbour",
    "PixelPrototype",
    "PretrainFinetune",
    "load_learner",
    "pretrain",
    "prototypes",
    "register_learner",
    "save_learner",
    "squared_distances",
    "validate_episode",
]
