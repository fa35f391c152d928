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
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fsl_course.checkpoint import Rebuildable, Registry, load_checkpoint
from fsl_course.runtime import device as default_device

#: modules whose import registers models; :func:`load_model` imports them first, so that a
#: checkpoint loads without the caller importing the module that defines its class.
MODEL_MODULES: list[str] = ["fsl_course.vae"]

#: what a model can do, in the order :func:`model_kind` checks it
KINDS = ("few-shot", "conditional", "unconditional")


class GenerativeModel(Rebuildable):
    """Base class of the registered generative models.

    Subclasses pass their constructor arguments to ``super().__init__(**kwargs)``; they
    become :attr:`config`, so they must be JSON-able. What the model can do is said by
    its methods (see the module docstring and :func:`model_kind`).
    """

    config_key: ClassVar[str] = "model"

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


#: model name -> model class; filled by :func:`register_model`.
GENERATORS = Registry(GenerativeModel, "generative model")

#: Class decorator: make a :class:`GenerativeModel` loadable by ``name``, e.g.
#: ``@register_model("my-vae") class MyVAE(GenerativeModel): ...``
register_model = GENERATORS.register


def save_model(model: GenerativeModel, path: str | os.PathLike, **extra_config: Any) -> Path:
    """Write ``model``'s ``state_dict`` and config to ``path`` (atomically).

    ``extra_config`` records how it was trained (``command``, ``seed``, ``budget``,
    ``dataset``, ...); :func:`load_model` gives it back as ``model.training_info``.
    """
    return GENERATORS.save(model, path, **extra_config)


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
    model = GENERATORS.rebuild(path, state_dict, config)
    return model.to(default_device() if device is None else torch.device(device))


__all__ = ["GENERATORS", "KINDS", "MODEL_MODULES", "GenerativeModel", "load_model", "model_kind", "register_model", "save_model"]
