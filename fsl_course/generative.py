"""The generative-model interface, a registry of models by name, and checkpoints.

This mirrors :mod:`fsl_course.meta.base` (the few-shot *learner* interface). A generative
model is an ``nn.Module`` that says what it can do through its methods:

* ``sample(n, *, generator=None) -> (n, 1, H, W)``: unconditional samples ``x ~ p(x)``;
* ``sample(labels, *, generator=None) -> (len(labels), 1, H, W)``: class-conditional samples
  ``x ~ p(x | y)``, for models with an integer attribute ``n_classes``;
* ``generate(support_x, n, *, generator=None) -> (n, 1, H, W)``: few-shot generation, new
  images of the class shown by the ``K`` support images ``support_x`` ``(K, 1, H, W)``.

Images are in ``[0, 1]`` with ink = 1 (a Bernoulli model returns its decoder means, i.e.
pixel probabilities). ``generator`` is a CPU ``torch.Generator``: the noise is drawn from it
on the CPU and moved, so a seed gives the same samples on every device.
:func:`model_kind` names which of the three a model is.

A model is rebuilt from ``{"model": name, "kwargs": constructor keyword arguments}`` plus
its ``state_dict`` (never a pickled module), which is what :func:`save_model` writes and
:func:`load_model` reads. Learner checkpoints store ``"learner"`` instead of ``"model"``, so
the two kinds are never confused.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from fsl_course.checkpoint import load_checkpoint, save_checkpoint
from fsl_course.runtime import device as default_device

#: model name -> model class; filled by :func:`register_model`.
GENERATORS: dict[str, type[GenerativeModel]] = {}

#: modules whose import registers models; :func:`load_model` imports them first, so that a
#: checkpoint loads without the caller importing the module that defines its class.
MODEL_MODULES: list[str] = ["fsl_course.vae"]

#: what a model can do, in the order :func:`model_kind` checks it
KINDS = ("few-shot", "conditional", "unconditional")

M = TypeVar("M", bound="type[GenerativeModel]")


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`GenerativeModel` loadable by ``name``.

    >>> @register_model("my-vae")                     # doctest: +SKIP
    ... class MyVAE(GenerativeModel): ...
    """

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
            raise TypeError(f"register_model({name!r}) decorates GenerativeModel subclasses, got {cls!r}")
        if name in GENERATORS and GENERATORS[name] is not cls:
            raise ValueError(f"a generative model named {name!r} is already registered ({GENERATORS[name].__qualname__})")
        cls.name = name
        GENERATORS[name] = cls
        return cls

    return decorator


class GenerativeModel(nn.Module):
    """Base class of the registered generative models.

    Subclasses pass their constructor arguments to ``super().__init__(**kwargs)``; they
    become :attr:`config`, so they must be JSON-able. What the model can do is said by
    its methods (see the module docstring and :func:`model_kind`).
    """

    name: ClassVar[str] = ""  # set by register_model

    def __init__(self, **kwargs: Any):
        super().__init__()
        if kwargs and type(self).__init__ is GenerativeModel.__init__:
            raise TypeError(f"{type(self).__name__} takes no arguments, got {sorted(kwargs)}")
        try:
            json.dumps(kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__} arguments must be JSON-able to be saved: {err}") from None
        self._kwargs = dict(kwargs)
        self.training_info: dict[str, Any] = {}  # how it was trained; filled in by load_model

    @property
    def config(self) -> dict[str, Any]:
        """``{"model": name, "kwargs": constructor arguments}``: enough to rebuild the model."""
        return {"model": self.name, "kwargs": dict(self._kwargs)}

    @property
    def device(self) -> torch.device:
        """Where the parameters are (CPU for a model without parameters)."""
        parameter = next(self.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device


def model_kind(model: nn.Module) -> str:
    """``"few-shot"`` (has ``generate(support_x, n)``), ``"conditional"`` (has ``n_classes``
    and ``sample(labels)``) or ``"unconditional"`` (has ``sample(n)``), checked in that order."""
    if callable(getattr(model, "generate", None)):
        return "few-shot"
    has_sample = callable(getattr(model, "sample", None))
    if has_sample and isinstance(getattr(model, "n_classes", None), int):
        return "conditional"
    if has_sample:
        return "unconditional"
    raise TypeError(f"{type(model).__name__} has neither sample(...) nor generate(...): it is not a generative model")


def save_model(model: GenerativeModel, path: str | os.PathLike, **extra_config: Any) -> Path:
    """Write ``model``'s ``state_dict`` and config to ``path`` (atomically).

    ``extra_config`` records how it was trained (``command``, ``seed``, ``budget``,
    ``dataset``, ...); :func:`load_model` gives it back as ``model.training_info``.
    """
    if not isinstance(model, GenerativeModel):
        raise TypeError(f"save_model expects a GenerativeModel, got {type(model).__name__}")
    if not model.name or GENERATORS.get(model.name) is not type(model):
        raise ValueError(f"{type(model).__name__} is not registered with @register_model, so it could not be loaded")
    config = model.config
    clash = sorted(set(extra_config) & set(config))
    if clash:
        raise ValueError(f"extra config keys {clash} clash with the model's own config keys {sorted(config)}")
    return save_checkpoint(path, model.state_dict(), {**config, **extra_config})


def load_model(path: str | os.PathLike, device: torch.device | str | None = None) -> GenerativeModel:
    """Rebuild a model saved by :func:`save_model`, in eval mode, on ``device``
    (default :func:`fsl_course.device`). A checkpoint written on a GPU loads on a CPU.

    Raises ``ValueError`` for an unreadable file, a few-shot learner checkpoint, an unknown
    model name, or a ``state_dict`` that does not fit the rebuilt model.
    """
    state_dict, config = load_checkpoint(path)
    if "model" not in config:
        if "learner" in config:
            raise ValueError(
                f"{path} is a few-shot learner checkpoint (learner {config['learner']!r}), not a generative model; "
                f"use `fsl-course eval {path}` (or fsl_course.meta.load_learner)"
            )
        raise ValueError(f"{path} is an fsl-course checkpoint but not of a generative model (its config has no 'model' entry)")
    for module in MODEL_MODULES:
        importlib.import_module(module)
    name = config["model"]
    if name not in GENERATORS:
        raise ValueError(
            f"{path} holds a generative model named {name!r}, which this version of fsl_course does not know; "
            f"known models: {', '.join(sorted(GENERATORS))}"
        )
    kwargs = config.get("kwargs", {})
    try:
        model = GENERATORS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"{path}: cannot rebuild model {name!r} from its saved arguments {kwargs}: {err}") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the saved weights do not fit model {name!r}{kwargs}: {err}") from None
    model.training_info = {k: v for k, v in config.items() if k not in ("model", "kwargs")}
    return model.to(default_device() if device is None else torch.device(device)).eval()


__all__ = ["GENERATORS", "KINDS", "MODEL_MODULES", "GenerativeModel", "load_model", "model_kind", "register_model", "save_model"]
