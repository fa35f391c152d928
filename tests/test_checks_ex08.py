"""Exercise 08 (few-shot diffusion): the visible checks in fsl_course.checks.ex08 and the hidden tests of
solutions/08_few_shot_diffusion.ipynb pass the solution and other right answers, and fail typical mistakes
(the visible checks with one line and a hint); Parts B and D are graded on their own."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from fsl_course.checks import CheckFailed, ex08
from solution_notebook import SolutionNotebook

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_08_PATH = ROOT / "solutions" / "08_few_shot_diffusion.ipynb"
PARTS = ("LoRALinear", "merge", "set_embedding", "lora_adapt")


SOL08 = SolutionNotebook("08_few_shot_diffusion.ipynb")
CELLS = SOL08.cells


@pytest.fixture(autouse=True)
def _own_random_state():
    """The hidden tests seed torch's global generator; keep that from leaking into tests that run later."""
    with torch.random.fork_rng(devices=[]):
        yield


def notebook_08(source: str = "") -> dict:
    """A fresh notebook namespace of exercise 08: its imports and the solution's four answers, then ``source``
    (a wrong or other answer) run in it, as if typed into a solution cell."""
    namespace: dict = {}
    for grade_id in ("imports", *PARTS):
        exec(compile(CELLS[grade_id], f"<exercise 08 cell {grade_id}>", "exec"), namespace)
    exec(compile(textwrap.dedent(source), "<exercise 08 answer>", "exec"), namespace)
    return namespace


run_hidden_08 = SOL08.run_hidden


# --------------------------------------------------------------------------- answers

LORA = """
class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha=None):
        super().__init__()
        self.base, self.rank = base, rank
        self.alpha = {alpha}
        self.scaling = {scaling}
        {freeze}
        w = base.weight
        self.A = {A}
        {init}
        self.B = {B}

    def forward(self, x):
        return {forward}
"""
LORA_RIGHT = dict(
    alpha="float(rank if alpha is None else alpha)", scaling="self.alpha / rank",
    freeze="for p in base.parameters(): p.requires_grad_(False)",
    A="nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))",
    init="nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))",
    B="nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))",
    forward="self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T")


def lora_variant(**changes) -> str:
    return LORA.format(**{**LORA_RIGHT, **changes})


MERGE = """
def merge(lora):
    base = lora.base
    layer = nn.Linear(base.in_features, base.out_features, bias={bias}, dtype={dtype}, device=base.weight.device)
    with torch.no_grad():
        layer.weight.copy_({weight})
        if base.bias is not None and layer.bias is not None:
            layer.bias.copy_(base.bias)
    return layer
"""
MERGE_RIGHT = dict(bias="base.bias is not None", dtype="base.weight.dtype", weight="base.weight + lora.scaling * lora.B @ lora.A")


def merge_variant(**changes) -> str:
    return MERGE.format(**{**MERGE_RIGHT, **changes})


SET = """
def set_embedding(features, mask):
    w = mask.to(features.dtype)
    return {body}
"""

ADAPT = """
def lora_adapt(model, support_x, rank, steps, lr, generator):
    {freeze}
    linears = [(n, m) for n, m in model.unet.named_modules() if {select}]
    for name, module in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.unet.get_submodule(parent) if parent else model.unet, child, LoRALinear(module, rank))
    optimizer = torch.optim.Adam([p for p in model.unet.parameters() if p.requires_grad], lr=lr)
    x0 = {x0}
    losses = []
    for _ in range(steps):
        loss = noise_prediction_loss(model.unet, {batch}, model.schedule, {generator})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append({record})
    return losses
"""
ADAPT_RIGHT = dict(freeze="for p in model.parameters(): p.requires_grad_(False)", select="type(m) is nn.Linear",
                   x0="2 * support_x - 1", batch="x0", generator="generator", record="loss.item()")


def adapt_variant(**changes) -> str:
    return ADAPT.format(**{**ADAPT_RIGHT, **changes})


# (part, wrong source, a piece of the visible check's one-line message)
MISTAKES_08 = [
    # Part A
    ("LoRALinear", lora_variant(freeze="pass"), "the base layer is frozen"),
    ("LoRALinear", lora_variant(init="nn.init.zeros_(self.A)"), "hint: with A = 0 and B = 0 the gradients of both are zero"),
    ("LoRALinear", lora_variant(scaling="self.alpha"), "hint: divide by the rank"),
    ("LoRALinear", lora_variant(scaling="rank / self.alpha"), "hint: alpha / rank, not rank / alpha"),
    ("LoRALinear", lora_variant(alpha="float(1 if alpha is None else alpha)"), "means alpha = rank: scaling 1"),
    ("LoRALinear", lora_variant(forward="self.base(x) + (x @ self.A.T) @ self.B.T", scaling="1.5"),
     "hint: multiply the update by scaling = alpha / rank"),
    ("LoRALinear", lora_variant(A="nn.Parameter(torch.empty(rank, base.in_features))",
                                B="nn.Parameter(torch.zeros(base.out_features, rank))"), "a float64 base layer gives float64 A, B"),
    ("LoRALinear", lora_variant(A="torch.empty(rank, base.in_features, dtype=w.dtype)", B="torch.zeros(base.out_features, rank, dtype=w.dtype)"),
     "A and B are nn.Parameter"),
    ("LoRALinear", lora_variant(A="nn.Parameter(0.01 * torch.randn(rank, base.in_features, dtype=w.dtype, device=w.device))",
                                init="pass", B="nn.Parameter(0.01 * torch.randn(base.out_features, rank, dtype=w.dtype, device=w.device))"),
     "B starts at zero"),
    ("LoRALinear", lora_variant(forward="self.base(x) + self.scaling * (x @ self.A.T).detach() @ self.B.T"), "dL/dB = scaling g^T"),
    # Part B
    ("merge", merge_variant(weight="base.weight + lora.B @ lora.A"), "hint: scale the update"),
    ("merge", merge_variant(weight="base.weight"), "hint: add the low-rank update"),
    ("merge", """
        def merge(lora):
            with torch.no_grad():
                lora.base.weight += lora.scaling * lora.B @ lora.A
            return lora.base
     """, "merge returns a new layer"),
    ("merge", merge_variant(bias="True"), "a base layer without bias gives a merged layer without bias"),
    ("merge", merge_variant(dtype="torch.float32"), "a float64 LoRA layer merges into a float64 layer"),
    # Part C
    ("set_embedding", SET.format(body="(features * w[..., None]).sum(dim=1) / features.shape[1]"),
     "hint: divide by the number of shots present"),
    ("set_embedding", SET.format(body="features.mean(dim=1)"), "hint: leave out the absent shots"),
    ("set_embedding", SET.format(body="(features * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)"),
     "a set with no shot present embeds as 0"),
    ("set_embedding", SET.format(body="(features * w[..., None]).sum(dim=1) / w.sum().clamp_min(1)"),
     "set 0 has shots [1, 2] and [3, 4] present"),
    ("set_embedding", SET.format(body="(features * w[..., None]).sum(dim=1).float() / w.sum(dim=1, keepdim=True).clamp_min(1).float()"),
     "float64 features give a float64 embedding"),
    # Part D
    ("lora_adapt", adapt_variant(x0="support_x"), "hint: map the shots from [0, 1] to the model's [-1, 1]"),
    ("lora_adapt", adapt_variant(freeze="pass"), "hint: first freeze every parameter of the model"),
    ("lora_adapt", adapt_variant(select="type(m) is nn.Linear and 'film' in n"), "every nn.Linear of model.unet is wrapped"),
    ("lora_adapt", adapt_variant(generator="torch.Generator().manual_seed(0)"),
     "hint: one generator for all the steps (the one passed in)"),
    ("lora_adapt", adapt_variant(batch="x0[torch.randint(len(x0), (16,), generator=generator)]"), "with lr = 0 nothing moves"),
    ("lora_adapt", adapt_variant(record="loss"), "a list of 3 Python floats"),
    ("lora_adapt", adapt_variant(record="loss.item()").replace("optimizer.step()", "pass"), "change B"),
]


@pytest.mark.parametrize("name, source, message", MISTAKES_08, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_08)])
def test_ex08_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    wrong = notebook_08(source)[name]
    with pytest.raises(CheckFailed) as failed:
        getattr(ex08, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_08], ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_08)])
def test_ex08_a_typical_mistake_fails_the_hidden_tests(name, source):
    namespace = notebook_08(source)
    with pytest.raises(Exception):  # an assertion, or the wrong answer's own error
        run_hidden_08(name, namespace)


RIGHT_08 = [  # other right answers: they pass the visible checks and the hidden tests
    ("LoRALinear", lora_variant(forward="self.base(x) + self.scaling * F.linear(F.linear(x, self.A), self.B)")),
    ("LoRALinear", lora_variant(freeze="base.requires_grad_(False)",
                                forward="F.linear(x, self.base.weight + self.scaling * self.B @ self.A, self.base.bias)")),
    ("merge", """
        def merge(lora):  # a deep copy of the base layer, its weight updated
            layer = copy.deepcopy(lora.base)
            with torch.no_grad():
                layer.weight += lora.scaling * lora.B @ lora.A
            layer.requires_grad_(True)
            return layer
    """),
    ("set_embedding", """
        def set_embedding(features, mask):  # row by row, boolean indexing
            rows = [f[m].mean(dim=0) if bool(m.any()) else f.new_zeros(f.shape[-1]) for f, m in zip(features, mask)]
            return torch.stack(rows)
    """),
    ("set_embedding", SET.format(body="(features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)")),
    ("lora_adapt", adapt_variant(select="isinstance(m, nn.Linear)")),
]


@pytest.mark.parametrize("name, source", RIGHT_08, ids=[f"{r[0]}-{i}" for i, r in enumerate(RIGHT_08)])
def test_ex08_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace = notebook_08(source)
    getattr(ex08, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_08(name, namespace)


def test_the_solution_08_passes_its_checks_and_hidden_tests(capsys):
    namespace = notebook_08()
    for name in PARTS:
        getattr(ex08, name)(namespace[name])
        run_hidden_08(name, namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(PARTS) and all(line.startswith("✓ ") for line in printed), printed


BROKEN_LORA = lora_variant(scaling="self.alpha", init="nn.init.zeros_(self.A)", freeze="pass")


@pytest.mark.parametrize("name", ["merge", "lora_adapt"])
def test_ex08_parts_b_and_d_are_graded_on_their_own(name, capsys):
    """A wrong LoRALinear (Part A) in the notebook costs nothing in Parts B and D, visible and hidden, and is back in
    place afterwards."""
    namespace = notebook_08(BROKEN_LORA)
    broken = namespace["LoRALinear"]
    with pytest.raises(CheckFailed):
        ex08.LoRALinear(broken)
    getattr(ex08, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    assert namespace["LoRALinear"] is broken
    run_hidden_08(name, namespace)
    assert namespace["LoRALinear"] is broken


def test_ex08_hidden_tests_of_part_d_restore_a_missing_lora_linear():
    namespace = notebook_08()
    del namespace["LoRALinear"]
    run_hidden_08("lora_adapt", namespace)
    assert "LoRALinear" not in namespace


def test_ex08_the_package_reference_does_not_pass_for_the_learners_layer():
    namespace = notebook_08("from fsl_course.diffusion import LoRALinear")
    with pytest.raises(CheckFailed, match="no attribute A, B"):
        ex08.LoRALinear(namespace["LoRALinear"])
    with pytest.raises(AssertionError, match="write the layer yourself"):
        run_hidden_08("LoRALinear", namespace)
