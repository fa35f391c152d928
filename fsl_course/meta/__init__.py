"""Few-shot learners behind one interface:
``learner.predict(support_x, support_y, query_x) -> logits (n_query, n_way)``, plus an episodic
training loss ``learner.loss(support_x, support_y, query_x, query_y)``.

* :mod:`fsl_course.meta.base`: the :class:`FewShotLearner` interface, the registry of
  learners by name, :func:`save_learner` / :func:`load_learner`.
* :mod:`fsl_course.meta.backbones`: the Conv-4 feature extractor.
* :mod:`fsl_course.meta.episodic`: :func:`train_episodic`, the episodic training loop (resumable).
* :mod:`fsl_course.meta.baselines`: pixel nearest neighbour, pixel prototype, and
  pretrain-then-fine-tune (Chen et al. 2019).
* metric-based (lesson 09): :mod:`~fsl_course.meta.protonet` (Prototypical Networks),
  :mod:`~fsl_course.meta.matching` (Matching Networks), :mod:`~fsl_course.meta.relation` (Relation Networks).
* optimisation-based (lesson 10): :mod:`fsl_course.meta.maml`: the functional (``torch.func``) MAML
  core, :func:`inner_adapt`, second or first order, Reptile's update, and the MAML, first-order MAML
  and Reptile learners.
* model-based (lesson 11): :mod:`~fsl_course.meta.mann` (a label-shifted LSTM learner),
  :mod:`~fsl_course.meta.hypernet` (a hypernetwork that generates the classifier).
"""

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import LEARNERS, FewShotLearner, load_learner, register_learner, save_learner, validate_episode
from fsl_course.meta.baselines import PixelNearestNeighbour, PixelPrototype, PretrainFinetune, pretrain
from fsl_course.meta.episodic import train_episodic
from fsl_course.meta.hypernet import HyperNetLearner
from fsl_course.meta.maml import MAML, FirstOrderMAML, Reptile, inner_adapt, maml_loss, parameters_of, reptile_update
from fsl_course.meta.mann import MANN
from fsl_course.meta.matching import MatchingNet
from fsl_course.meta.protonet import ProtoNet, prototypes, squared_distances
from fsl_course.meta.relation import RelationNet

__all__ = [
    "LEARNERS",
    "MAML",
    "MANN",
    "Conv4",
    "FewShotLearner",
    "FirstOrderMAML",
    "HyperNetLearner",
    "MatchingNet",
    "PixelNearestNeighbour",
    "PixelPrototype",
    "PretrainFinetune",
    "ProtoNet",
    "RelationNet",
    "Reptile",
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
    "train_episodic",
    "validate_episode",
]
