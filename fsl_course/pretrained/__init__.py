"""Pre-trained models shipped with the package: diffusion models, so that lessons 07 and 08 show samples
of models trained longer than a lesson can afford on a CPU, and the meta-learners of lessons 09-11, so
that a lesson can compare eight methods on 600 episodes in its 5 minutes. Each file is an ordinary checkpoint written by
``fsl-course train`` (a ``state_dict`` plus a JSON config, never a pickled module); its config
records the exact command, seed, budget, device and wall time. Re-create one, from the
repository root, with its command in :data:`RECIPES` (:func:`recreate_command`), e.g.::

    fsl-course train ddpm --dataset glyphs --budget standard --out fsl_course/pretrained/ddpm.pt --seed 0 --steps 4000 --no-rotations

(the standard budget's batch size and learning rate, with 4,000 instead of 800 steps: 13 to 30
minutes each on a 2-core CPU; each file's config records its ``wall_time_s``).

==============  =====================================================================================
``ddpm``        unconditional DDPM on the glyph training classes (lesson 07: samplers; lesson 08:
                fine-tuning and LoRA)
``cond-ddpm``   class-conditional DDPM with label dropout (lesson 07: classifier-free guidance)
``set-ddpm``    DDPM conditioned on a support set: its embedding and mean image (lesson 08:
                few-shot generation without fine-tuning; lesson 07: prototype conditioning)
``protonet``,   the metric-based learners (lesson 09)
``matching``,
``relation``
``maml``,       the optimisation-based learners (lesson 10)
``fomaml``,
``reptile``
``mann``,       the model-based learners (lesson 11)
``hypernet``
==============  =====================================================================================

The meta-learners are made by ``fsl-course train NAME --dataset glyphs --budget standard --out
fsl_course/pretrained/NAME.pt --seed 0``: exactly the standard budget, at most 5 minutes each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsl_course.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
#: name -> the command that made ``fsl_course/pretrained/<name>.pt`` (a test checks each file records exactly it)
RECIPES = {
    "ddpm": "fsl-course train ddpm --dataset glyphs --budget standard --out fsl_course/pretrained/ddpm.pt --seed 0 --steps 4000 --no-rotations",
    "cond-ddpm": "fsl-course train cond-ddpm --dataset glyphs --budget standard --out fsl_course/pretrained/cond-ddpm.pt --seed 0 --steps 4000",
    "set-ddpm": "fsl-course train set-ddpm --dataset glyphs --budget standard --out fsl_course/pretrained/set-ddpm.pt --seed 0 --steps 4000",
}
#: the few-shot learners (loaded with :func:`fsl_course.meta.load_learner`): the standard budget, nothing changed
LEARNER_NAMES = ("protonet", "matching", "relation", "maml", "fomaml", "reptile", "mann", "hypernet")
RECIPES.update({name: f"fsl-course train {name} --dataset glyphs --budget standard --out fsl_course/pretrained/{name}.pt --seed 0"
                for name in LEARNER_NAMES})
NAMES = tuple(RECIPES)
MAX_TOTAL_BYTES = 20 * 2**20  # the package ships at most 20 MB of weights


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"no pre-trained model {name!r}; the package ships {', '.join(NAMES)}")
    return name


def path(name: str) -> Path:
    """The file of the shipped model ``name`` (one of :data:`NAMES`)."""
    file = HERE / f"{_check_name(name)}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from this installation; re-create it with: {recreate_command(name)}")
    return file


def load(name: str, device: torch.device | str | None = None):
    """The shipped model ``name``, rebuilt with :func:`fsl_course.generative.load_model` (a generative
    model) or :func:`fsl_course.meta.load_learner` (a few-shot learner, :data:`LEARNER_NAMES`), in eval
    mode on ``device`` (default :func:`fsl_course.device`)."""
    if name in LEARNER_NAMES:
        from fsl_course.meta import load_learner

        return load_learner(path(name), device=device)
    from fsl_course.generative import load_model

    return load_model(path(name), device=device)


def config(name: str) -> dict:
    """The shipped model's checkpoint config: ``command``, ``seed``, ``budget``, ``wall_time_s``, ``training``, ..."""
    return load_checkpoint(path(name))[1]


def recreate_command(name: str) -> str:
    """The ``fsl-course train`` command that makes the shipped file ``name`` (run it from the repository root)."""
    return RECIPES[_check_name(name)]


__all__ = ["LEARNER_NAMES", "MAX_TOTAL_BYTES", "NAMES", "RECIPES", "config", "load", "path", "recreate_command"]
