"""The ``fsl-course`` command line. Each subcommand lives in the module that owns the
concept (data, evaluation, exercises, grading, ...); this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "doctor": ("fsl_course.doctor", "environment, device, budget, cache and data report"),
    "data": ("fsl_course.data.cli", "list datasets, or draw a grid of a dataset's classes"),
    "train": ("fsl_course.train", "train a model or few-shot learner and save a checkpoint"),
    "eval": ("fsl_course.evaluation", "learners: episodic accuracy with a 95% CI; generative models: Fréchet distance, few-shot generation scores, NLL"),
    "sample": ("fsl_course.sample", "draw a grid of samples from a generative-model checkpoint"),
    "adapt": ("fsl_course.few_shot_diffusion", "adapt a pre-trained diffusion model to a new class from K shots (finetune, lora, condition)"),
    "exercises": ("fsl_course.exercises", "build exercises/ from solutions/, or check they are in sync"),
    "grade": ("fsl_course.grading", "grade a submitted exercise notebook against the hidden tests"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. Only ``command``'s module is imported (all of them when ``None``), so that
    ``fsl-course exercises check`` does not wait for torch and ``fsl-course eval`` not for nbformat."""
    parser = argparse.ArgumentParser(prog="fsl-course", description="Few-shot learning course tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        if command in (None, name):
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        # Bad input: one clear line, not a stack trace.
        print(f"fsl-course {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
