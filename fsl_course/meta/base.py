"""The few-shot learner interface, a registry of learners by name, and checkpoints.

A few-shot learner solves one N-way K-shot *episode*: given a labelled support set
``S = {(x_i, y_i)}`` with labels ``y_i in {0, ..., N-1}`` and unlabelled queries ``x_q``,
it returns logits ``l(x_q)`` of shape ``(n_query, N)``; the prediction is ``argmax_c l_c(x_q)``.
Every learner in :mod:`fsl_course.meta` implements this one method, so
:func:`fsl_course.evaluation.evaluate` and ``fsl-course eval`` work with all of them.

A learner is rebuilt from ``{"learner": name, "kwargs": constructor keyword arguments}``
plus its ``state_dict`` (never a pickled module), which is what :func:`save_learner`
writes and :func:`load_learner` reads.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fsl_course.checkpoint import Rebuildable, Registry, load_checkpoint
from fsl_course.runtime import device as default_device


class FewShotLearner(Rebuildable):
    """Base class of every few-shot learner.

    Subclasses pass their constructor arguments to ``super().__init__(**kwargs)`` (they
    become :attr:`config`, so they must be JSON-able) and implement :meth:`episode_logits`.
    Users call :meth:`predict`, which validates the episode first.
    """

    config_key: ClassVar[str] = "learner"

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits for the queries of one episode.

        Args:
            support_x: ``(n_support, 1, H, W)`` float images.
            support_y: ``(n_support,)`` int64 labels; the distinct labels are exactly ``0..N-1``.
            query_x: ``(n_query, 1, H, W)`` float images of the same size.

        Returns:
            ``(n_query, N)`` logits; ``logits.argmax(1)`` is the predicted label.
        """
        n_way = validate_episode(support_x, support_y, query_x)
        parameter = next(self.parameters(), None)
        if parameter is not None and parameter.device != support_x.device:
            raise ValueError(
                f"the episode is on {support_x.device} but the learner is on {parameter.device}; "
                "move one of them, e.g. episode.to(device) or learner.to(device)"
            )
        return self.episode_logits(support_x, support_y, query_x, n_way)

    def episode_logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """The learner's algorithm, on a validated episode (see :meth:`predict`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement episode_logits")

    def loss(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """The episodic training loss (a scalar), minimised by :func:`fsl_course.meta.episodic.train_episodic`.

        Default: the query cross-entropy ``-(1 / n_query) sum_q log softmax(logits(x_q))_{y_q}`` of
        :meth:`predict`'s logits. Learners with another objective (Relation Networks' squared error,
        Reptile's update) override it.
        """
        if query_y.shape != query_x.shape[:1] or query_y.dtype != torch.int64:
            raise ValueError(f"query_y must be int64 labels of shape ({query_x.shape[0]},), got {query_y.dtype} {tuple(query_y.shape)}")
        return F.cross_entropy(self.predict(support_x, support_y, query_x), query_y)

    def batch_loss(self, episodes) -> torch.Tensor:
        """The mean :meth:`loss` over a meta-batch of :class:`~fsl_course.episodes.Episode` objects."""
        return sum(self.loss(e.support_x, e.support_y, e.query_x, e.query_y) for e in episodes) / len(episodes)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimiser of episodic training: Adam over every trainable parameter."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)


def validate_episode(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> int:
    """Check one episode's tensors and return its number of classes ``N``.

    Raises ``ValueError`` (``TypeError`` for non-tensors) saying what is wrong: images must be
    float ``(n, 1, H, W)`` with the same ``H, W`` for support and query; labels int64 ``(n_support,)``
    whose distinct values are exactly ``0..N-1``; all on one device.
    """
    for what, value in (("support_x", support_x), ("support_y", support_y), ("query_x", query_x)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    for what, images in (("support_x", support_x), ("query_x", query_x)):
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"{what} must have shape (n, 1, H, W) (one grey channel), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{what} must be a float tensor with values in [0, 1], got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError(f"{what} is empty: an episode needs at least one support and one query image")
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(
            f"support and query images differ in size: {tuple(support_x.shape[2:])} vs {tuple(query_x.shape[2:])}"
        )
    if support_y.dtype != torch.int64:
        raise ValueError(f"support_y must be int64 (torch.long) labels, got dtype {support_y.dtype}")
    if support_y.shape != support_x.shape[:1]:
        raise ValueError(
            f"support_y must have shape (n_support,) = ({support_x.shape[0]},) to match support_x, "
            f"got {tuple(support_y.shape)}"
        )
    if not (support_x.device == support_y.device == query_x.device):
        raise ValueError(
            f"episode tensors are on different devices: support_x {support_x.device}, "
            f"support_y {support_y.device}, query_x {query_x.device}"
        )
    labels = torch.unique(support_y).tolist()
    n_way = len(labels)
    if labels != list(range(n_way)):
        raise ValueError(
            f"support labels must be exactly 0..N-1 (N = number of classes); got the label set {labels}. "
            "Relabel the episode's classes 0..N-1 (fsl_course.episodes does this)."
        )
    return n_way


#: learner name -> learner class; filled by :func:`register_learner`.
LEARNERS = Registry(FewShotLearner, "learner")

#: modules whose import registers learners; :func:`load_learner` imports them first, so that a
#: checkpoint loads without the caller importing the module that defines its class.
LEARNER_MODULES: list[str] = [
    "fsl_course.meta.baselines", "fsl_course.dagan", "fsl_course.meta.protonet", "fsl_course.meta.matching",
    "fsl_course.meta.relation", "fsl_course.meta.maml", "fsl_course.meta.mann", "fsl_course.meta.hypernet",
]

#: Class decorator: make a :class:`FewShotLearner` loadable by ``name``, e.g.
#: ``@register_learner("my-learner") class MyLearner(FewShotLearner): ...``
register_learner = LEARNERS.register


def save_learner(learner: FewShotLearner, path: str | os.PathLike, **extra_config: Any) -> Path:
    """Write ``learner``'s ``state_dict`` and config to ``path`` (atomically).

    ``extra_config`` records how it was trained (``command``, ``seed``, ``budget``,
    ``dataset``, ...); :func:`load_learner` gives it back as ``learner.training_info``.
    """
    return LEARNERS.save(learner, path, **extra_config)


def load_learner(path: str | os.PathLike, device: torch.device | str | None = None) -> FewShotLearner:
    """Rebuild a learner saved by :func:`save_learner`, in eval mode, on ``device``
    (default :func:`fsl_course.device`). A checkpoint written on a GPU loads on a CPU.

    Raises ``ValueError`` for an unreadable file, an unknown learner name, or a
    ``state_dict`` that does not fit the rebuilt learner.
    """
    state_dict, config = load_checkpoint(path)
    for module in LEARNER_MODULES:
        importlib.import_module(module)
    learner = LEARNERS.rebuild(path, state_dict, config)
    return learner.to(default_device() if device is None else torch.device(device))
