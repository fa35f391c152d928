"""Checkpoints: a ``state_dict`` plus a JSON-able config, never a pickled module.

The file is written with ``torch.save`` and read with ``weights_only=True``, so loading
one cannot run code, and it always loads onto the CPU (move it with ``.to(device())``).

:class:`Registry` saves and rebuilds :class:`Rebuildable` modules by registered name:
``fsl_course.meta`` keeps one for few-shot learners, ``fsl_course.generative`` one for
generative models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from fsl_course.cache import atomic_write

FORMAT = "fsl-course-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable fsl-course checkpoint."""


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``{state_dict, config}`` to ``path`` atomically. ``config`` must be JSON-able
    (it says how to rebuild the model: class name, sizes, training command, seed, budget)."""
    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"checkpoint config must be JSON-serialisable: {err}") from err
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": config_json, "state_dict": state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict, config)`` on CPU.

    Raises :class:`CheckpointError` with a clear message for a missing, truncated or
    foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by `fsl-course train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, random bytes, ...
        raise CheckpointError(
            f"{path} is not a readable fsl-course checkpoint (truncated or a foreign file?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not an fsl-course checkpoint: expected a dict with "
            f"format={FORMAT!r}, a JSON config and a state_dict"
        )
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {blob.get('version')}, this package reads {FORMAT_VERSION}")
    return blob["state_dict"], json.loads(blob["config"])


# --------------------------------------------------------------------------- modules rebuilt by name


class Rebuildable(torch.nn.Module):
    """A module that a :class:`Registry` can save and rebuild: its constructor keyword arguments
    (JSON-able) are kept as :attr:`config`, under the registry's key, next to its registered name.

    Subclasses pass their constructor arguments to ``super().__init__(**kwargs)``.
    """

    name: ClassVar[str] = ""  # set by Registry.register
    config_key: ClassVar[str] = ""  # "learner", "model": set by the base class of a registry

    def __init__(self, **kwargs: Any):
        super().__init__()
        if kwargs and type(self).__init__ is Rebuildable.__init__:
            raise TypeError(f"{type(self).__name__} takes no arguments, got {sorted(kwargs)}")
        try:
            json.dumps(kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__} arguments must be JSON-able to be saved: {err}") from None
        self._kwargs = dict(kwargs)
        self.training_info: dict[str, Any] = {}  # how it was trained; filled in by Registry.rebuild

    @property
    def config(self) -> dict[str, Any]:
        """``{config_key: name, "kwargs": constructor arguments}``: enough to rebuild the module."""
        return {self.config_key: self.name, "kwargs": dict(self._kwargs)}


class Registry(dict):
    """Registered name -> subclass of ``base`` (a :class:`Rebuildable`), with checkpoints.

    ``fsl_course.meta`` keeps one for few-shot learners (key ``"learner"``) and
    ``fsl_course.generative`` one for generative models (key ``"model"``); ``noun`` names the
    kind in error messages.
    """

    def __init__(self, base: type[Rebuildable], noun: str):
        super().__init__()
        self.base, self.key, self.noun = base, base.config_key, noun

    def register(self, name: str):
        """Class decorator: make a subclass of ``base`` loadable by ``name``."""

        def decorator(cls):
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"register_{self.key}({name!r}) decorates {self.base.__name__} subclasses, got {cls!r}")
            if name in self and self[name] is not cls:
                raise ValueError(f"a {self.noun} named {name!r} is already registered ({self[name].__qualname__})")
            cls.name = name
            self[name] = cls
            return cls

        return decorator

    def save(self, module: Rebuildable, path: str | os.PathLike, **extra_config: Any) -> Path:
        """Write ``module``'s ``state_dict`` and config to ``path`` (atomically); ``extra_config``
        (how it was trained) comes back as ``training_info`` when it is rebuilt."""
        if not isinstance(module, self.base):
            raise TypeError(f"save_{self.key} expects a {self.base.__name__}, got {type(module).__name__}")
        if not module.name or self.get(module.name) is not type(module):
            raise ValueError(f"{type(module).__name__} is not registered with @register_{self.key}, so it could not be loaded")
        config = module.config
        clash = sorted(set(extra_config) & set(config))
        if clash:
            raise ValueError(f"extra config keys {clash} clash with the {self.key}'s own config keys {sorted(config)}")
        return save_checkpoint(path, module.state_dict(), {**config, **extra_config})

    def rebuild(self, path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Rebuildable:
        """The registered module that ``config`` names, with ``state_dict`` loaded, in eval mode, on
        the CPU. Raises ``ValueError`` for an unknown name or weights that do not fit."""
        name = config.get(self.key)
        if name not in self:
            raise ValueError(
                f"{path} holds a {self.noun} named {name!r}, which this version of fsl_course does not know; "
                f"known {self.key}s: {', '.join(sorted(self))}"
            )
        kwargs = config.get("kwargs", {})
        try:
            module = self[name](**kwargs)
        except TypeError as err:
            raise ValueError(f"{path}: cannot rebuild {self.key} {name!r} from its saved arguments {kwargs}: {err}") from None
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: the saved weights do not fit {self.key} {name!r}{kwargs}: {err}") from None
        module.training_info = {k: v for k, v in config.items() if k not in (self.key, "kwargs")}
        return module.eval()
