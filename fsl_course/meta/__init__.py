"""Few-shot learners behind one interface:
``learner.predict(support_x, support_y, query_x) -> logits (n_query, n_way)``.

* :mod:`fsl_course.meta.base`: the :class:`FewShotLearner` interface, the registry of
  learners by name, :func:`save_learner` / :func:`load_learner`.
* :mod:`fsl_course.meta.backbones`: the Conv-4 feature extractor.
* :mod:`fsl_course.meta.baselines`: pixel nearest neighbour, pixel prototype, and
  pretrain-then-fine-tune (Chen et al. 2019).
* :mod:`fsl_course.meta.maml`: the functional (``torch.func``) MAML core, :func:`inner_adapt`,
  second or first order, and Reptile's update.
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
from fsl_course.meta.maml import inner_adapt, maml_loss, parameters_of, reptile_update

__all__ = [
    "LEARNERS",
    "Conv4",
    "FewShotLearner",
    "PixelNearestNeighbour",
    "PixelPrototype",
    "PretrainFinetune",
    "inner_adapt",
    "load_learner",
    "maml_loss",
    "parameters_of",
    "pretrain",
    "prototypes",
    "register_learner",
    "reptile_update",
    "save_learner",
    "squared_distances",
    "validate_episode",
]
