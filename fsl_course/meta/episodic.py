r"""Episodic training: learn to learn by solving many small tasks drawn from the training classes.

Each step draws ``meta_batch`` N-way K-shot episodes ``(S_i, Q_i)`` from the training split and
takes one optimiser step on the mean of the learners' episodic losses,

    L(theta) = (1 / B) sum_i learner.loss(S_i, Q_i),

so training looks exactly like testing: a support set to learn from, queries to answer
(Vinyals et al. 2016, "test and train conditions must match"). The learning rate follows a
cosine decay from ``lr`` to 0 over the ``steps``.

Interrupted runs resume: every ``save_every_s`` seconds (and on Ctrl-C) the loop writes its
state (learner and optimiser state, step, random generators, losses) to ``resume``; called
again with the same arguments it continues from there and ends with the same weights as an
uninterrupted run. The file is removed when training finishes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fsl_course.cache import atomic_write
from fsl_course.episodes import EpisodeSampler
from fsl_course.meta.base import FewShotLearner

RESUME_FORMAT = "fsl-course-resume"


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """``lr * (1 + cos(pi * step / steps)) / 2``: ``lr`` at step 0, 0 at the end."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def _save_state(path: Path, fingerprint: str, step: int, learner, optimizer, generators, losses, elapsed) -> None:
    """``generators``: ``(episode generator state, torch generator state)`` at the start of ``step``."""
    state = {
        "format": RESUME_FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "learner": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "episode_generator": generators[0],
        "torch_generator": generators[1],
        "losses": list(losses),
        "elapsed": elapsed,
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable resume file ({type(err).__name__}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not an fsl-course resume file; delete it to start afresh")
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} holds an interrupted run with different settings:\n  saved: {state['fingerprint']}\n  now:   {fingerprint}\n"
            "delete it (or pass --restart to fsl-course train) to start afresh"
        )
    return state


def train_episodic(
    learner: FewShotLearner,
    dataset,
    *,
    way: int,
    shot: int,
    query: int,
    steps: int,
    lr: float,
    meta_batch: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    resume: str | os.PathLike | None = None,
    save_every_s: float = 30.0,
) -> dict[str, list[float]]:
    """Train ``learner`` in place on ``steps`` steps of ``meta_batch`` ``way``-way ``shot``-shot
    episodes with ``query`` queries per class; returns ``{"loss": [mean episode loss per step],
    "seconds": training time, including the time before an interruption}``.

    Args:
        learner: a :class:`FewShotLearner`; its ``batch_loss(episodes)`` (the mean of its
            ``loss(support_x, support_y, query_x, query_y)`` unless it says otherwise) is minimised with
            the optimiser from its ``make_optimizer(lr)`` (Adam unless it says otherwise).
        dataset: a :class:`~fsl_course.data.FewShotDataset` (the training split) or a dense
            ``(C, n, 1, H, W)`` tensor.
        steps, lr: optimiser steps and the peak learning rate (cosine decay to 0).
        meta_batch: episodes averaged per step.
        seed: seeds the episode stream (the learner keeps its own initialisation).
        resume: a file for the training state; if it exists (same settings) training continues from it.
        save_every_s: how often (seconds) to write ``resume``.
    """
    if steps < 1 or meta_batch < 1:
        raise ValueError(f"steps and meta_batch must be >= 1, got steps={steps}, meta_batch={meta_batch}")
    learner.to(device).train()
    sampler = EpisodeSampler(dataset, way, shot, query, seed=seed)
    optimizer = learner.make_optimizer(lr)
    n_classes = sampler.images.shape[0]
    fingerprint = json.dumps({"learner": learner.config, "way": way, "shot": shot, "query": query, "steps": steps,
                              "lr": lr, "meta_batch": meta_batch, "seed": seed, "classes": n_classes}, sort_keys=True)
    losses: list[float] = []
    start_step, elapsed_before = 0, 0.0
    resume = Path(resume) if resume is not None else None
    if resume is not None and resume.exists():
        state = _load_state(resume, fingerprint)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["episode_generator"])
        torch.set_rng_state(state["torch_generator"])
        losses, start_step, elapsed_before = state["losses"], state["step"], state["elapsed"]
        if progress:
            print(f"resuming from step {start_step} of {steps} ({resume})", flush=True)

    # the random state at the start of step len(losses): an interrupted step is redone from it
    generators = (sampler.generator.get_state(), torch.get_rng_state())
    buffers = {}
    started = last_save = time.perf_counter()
    step = start_step
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"train {learner.name}",
               disable=not progress, leave=False)
    try:
        for step in bar:
            # running statistics (batch norm) move during the forward passes: keep them to undo a half-done step
            buffers = {name: b.clone() for name, b in learner.named_buffers()}
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            optimizer.zero_grad()
            loss = learner.batch_loss([sampler.sample().to(device) for _ in range(meta_batch)])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            generators = (sampler.generator.get_state(), torch.get_rng_state())
            if step % 10 == 0:
                recent = losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
            if resume is not None and time.perf_counter() - last_save > save_every_s:
                _save_state(resume, fingerprint, step + 1, learner, optimizer, generators, losses,
                            elapsed_before + time.perf_counter() - started)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        if resume is not None:
            done = len(losses)  # steps whose update was applied; the interrupted one is redone from its generators
            if done == step:  # interrupted inside the step: put back the running statistics of its start
                learner.load_state_dict(buffers, strict=False)
            _save_state(resume, fingerprint, done, learner, optimizer, generators, losses, elapsed_before + time.perf_counter() - started)
            print(f"\ninterrupted at step {done} of {steps}; the state is in {resume}: run the same command again to resume",
                  flush=True)
        raise
    if resume is not None and resume.exists():
        resume.unlink()
    learner.eval()
    return {"loss": losses, "seconds": elapsed_before + time.perf_counter() - started}


__all__ = ["cosine_lr", "train_episodic"]
