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

import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from fsl_course.checkpoint import load_checkpoint, save_checkpoint
from fsl_course.runtime import device as default_device

#: learner name -> learner class; filled by :func:`register_learner`.
LEARNERS: dict[str, type[FewShotLearner]] = {}

L = TypeVar("L", bound="type[FewShotLearner]")


def register_learner(name: str) -> Callable[[L], L]:
    """Class decorator: make a :class:`FewShotLearner` loadable by ``name``.

    >>> @register_learner("my-learner")               # doctest: +SKIP
    ... class MyLearner(FewShotLearner): ...
    """

    def decorator(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, FewShotLearner)):
            raise TypeError(f"register_learner({name!r}) decorates FewShotLearner subclasses, got {cls!r}")
        if name in LEARNERS and LEARNERS[name] is not cls:
            raise ValueError(f"a learner named {name!r} is already registered ({LEARNERS[name].__qualname__})")
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return decorator


class FewShotLearner(nn.Module):
    """Base class of every few-shot learner.

    Subclasses pass their constructor arguments to ``super().__init__(**kwargs)`` (they
    become :attr:`config`, so they must be JSON-able) and implement :meth:`episode_logits`.
    Users call :meth:`predict`, which validates the episode first.
    """

    name: ClassVar[str] = ""  # set by register_learner

    def __init__(self, **kwargs: Any):
        super().__init__()
        if kwargs and type(self).__init__ is FewShotLearner.__init__:
            raise TypeError(f"{type(self).__name__} takes no arguments, got {sorted(kwargs)}")
        try:
            json.dumps(kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__} arguments must be JSON-able to be saved: {err}") from None
        self._kwargs = dict(kwargs)
        self.training_info: dict[str, Any] = {}  # how it was trained; filled in by load_learner

    @property
    def config(self) -> dict[str, Any]:
        """``{"learner": name, "kwargs": constructor arguments}``: enough to rebuild the learner."""
        return {"learner": self.name, "kwargs": dict(self._kwargs)}

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


def save_learner(learner: FewShotLearner, path: str | os.PathLike, **extra_config: Any) -> Path:
    """Write ``learner``'s ``state_dict`` and config to ``path`` (atomically).

    ``extra_config`` records how it was trained (``command``, ``seed``, ``budget``,
    ``dataset``, ...); :func:`load_learner` gives it back as ``learner.training_info``.
    """
    if not isinstance(learner, FewShotLearner):
        raise TypeError(f"save_learner expects a FewShotLearner, got {type(learner).__name__}")
    if not learner.name or LEARNERS.get(learner.name) is not type(learner):
        raise ValueError(f"{type(learner).__name__} is not registered with @register_learner, so it could not be loaded")
    config = learner.config
    clash = sorted(set(extra_config) & set(config))
    if clash:
        raise ValueError(f"extra config keys {clash} clash with the learner's own config keys {sorted(config)}")
    return save_checkpoint(path, learner.state_dict(), {**config, **extra_config})


def load_learner(path: str | os.PathLike, device: torch.device | str | None = None) -> FewShotLearner:
    """Rebuild a learner saved by :func:`save_learner`, in eval mode, on ``device``
    (default :func:`fsl_course.device`). A checkpoint written on a GPU loads on a CPU.

    Raises ``ValueError`` for an unreadable file, an unknown learner name, or a
    ``state_dict`` that does not fit the rebuilt learner.
    """
    state_dict, config = load_checkpoint(path)
    name = config.get("learner")
    if name not in LEARNERS:
        raise ValueError(
            f"{path} holds a learner named {name!r}, which this version of fsl_course does not know; "
            f"known learners: {', '.join(sorted(LEARNERS))}"
        )
    kwargs = config.get("kwargs", {})
    try:
        learner = LEARNERS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"{path}: cannot rebuild learner {name!r} from its saved arguments {kwargs}: {err}") from None
    try:
        learner.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the saved weights do not fit learner {name!r}{kwargs}: {err}") from None
    learner.training_info = {k: v for k, v in config.items() if k not in ("learner", "kwargs")}
    return learner.to(default_device() if device is None else torch.device(device)).eval()
