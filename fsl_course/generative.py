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
MODEL_MODULES: list[str] = ["fsl_course.vae", "fsl_course.gan", "fsl_course.diffusion", "fsl_course.few_shot_diffusion"]

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


# --------------------------------------------------------------------------- input checks and noise
# shared by the generative modules (vae, gan, ...): clear errors instead of stack traces from inside torch

IMAGE_SHAPE = (1, 28, 28)


def dense_images(dataset, model=None) -> torch.Tensor:
    """The training images of ``dataset``, a :class:`~fsl_course.data.FewShotDataset` or a dense
    ``(C, n, 1, 28, 28)`` tensor (class ``c`` has label ``c``). A class-conditional ``model``
    (``n_classes`` not None) must have ``C`` classes."""
    images = getattr(dataset, "images", dataset)
    if not isinstance(images, torch.Tensor) or images.ndim != 5 or tuple(images.shape[2:]) != IMAGE_SHAPE:
        raise ValueError("dataset must be a FewShotDataset or a dense (C, n, 1, 28, 28) image tensor")
    n_classes = getattr(model, "n_classes", None)
    if n_classes is not None and n_classes != images.shape[0]:
        raise ValueError(f"the {type(model).__name__} has {n_classes} classes but the dataset {images.shape[0]}")
    return images


def check_tensor(name: str, value, *, floating: bool = True, min_ndim: int = 1) -> None:
    """Raise a clear error unless ``value`` is a tensor (floating if asked) with at least ``min_ndim`` dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.ndim < min_ndim:
        raise ValueError(f"{name} must have a batch dimension (at least {min_ndim} dims), got shape {tuple(value.shape)}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Floating tensors with a batch dimension and one common shape."""
    for name, value in tensors.items():
        check_tensor(name, value)
    shapes = {name: tuple(value.shape) for name, value in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def check_count(name: str, n) -> int:
    """``n`` if it is a positive int, else a clear ``ValueError``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def check_labels(y, n_classes: int, batch: int | None = None, name: str = "y") -> None:
    """Raise a clear error unless ``y`` is a 1-D int64 tensor of ``batch`` labels in ``0..n_classes - 1``."""
    check_tensor(name, y, floating=False)
    if y.dtype != torch.int64 or y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int64 (torch.long) tensor of class labels, got dtype {y.dtype}, shape {tuple(y.shape)}")
    if batch is not None and len(y) != batch:
        raise ValueError(f"{name} has {len(y)} labels for {batch} images")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must be class labels in 0..{n_classes - 1}, got values in [{y.min().item()}, {y.max().item()}]")


def standard_normal(shape, *, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps ~ N(0, I)`` of ``shape`` with ``like``'s dtype and device.

    With a ``generator`` the numbers are drawn on the generator's device (a CPU generator:
    the CPU) and moved, so the same seed gives the same noise on CPU and GPU.
    """
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


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
