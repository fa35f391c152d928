"""``fsl-course sample CKPT --n 64 --out grid.png [--seed 0]``: a PNG grid of samples.

What is drawn depends on what the checkpoint's model can do (:func:`fsl_course.generative.model_kind`):

* unconditional (``vae``, ``dcgan``, ``wgan-gp``): ``--n`` samples, ``--cols`` per row;
* class-conditional (``cvae``, ``cgan``): one column per class, ``--labels 0,1,2`` or the first
  ``--classes N`` training classes, cycling until there are ``--n`` samples;
* few-shot (``set-vae``, ``set-ddpm``): the support images in the first row(s), a gap, then ``--n`` new
  images of their class. Support images come from ``--support`` (PNG/JPEG/BMP files, or folders
  of them) or from a dataset: ``--dataset`` (default: the one the model was trained on),
  ``--split`` (default test, classes never seen in training), ``--class-index``, ``--shot``.

Support files are read as greyscale, resized to 28x28 and scaled to [0, 1]; if their
border (the outermost ring of pixels) averages above 0.5 the background is light, so the
image is inverted to make ink = 1. The noise comes from a CPU generator seeded with
``--seed``, so a seed gives the same grid on every device. The PNG shows dark ink on white,
tiles separated by light grey lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a generative-model checkpoint written by `fsl-course train`")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", required=True, metavar="PNG", help="the grid image to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise (default 0)")
    parser.add_argument("--cols", type=int, default=8, help="images per row (default 8; conditional: one column per class)")
    parser.add_argument("--scale", type=int, default=3, help="pixels per image pixel in the PNG (default 3)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: fsl_course.device())")
    conditional = parser.add_argument_group("class-conditional models").add_mutually_exclusive_group()
    conditional.add_argument("--labels", default=None, metavar="I,J,...", help="class indices, one column each")
    conditional.add_argument("--classes", type=int, default=None, metavar="N", help="the first N classes (default min(8, classes))")
    diffusion = parser.add_argument_group("diffusion models (ddpm, cond-ddpm, set-ddpm)")
    diffusion.add_argument("--sampler", choices=("ancestral", "ddim"), default=None,
                           help="default ancestral (all T steps) for ddpm and cond-ddpm, ddim for set-ddpm")
    diffusion.add_argument("--steps", type=int, default=None, metavar="N", help="DDIM steps (default 50)")
    diffusion.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default 0: deterministic)")
    diffusion.add_argument("--guidance", type=float, default=None, metavar="W",
                           help="classifier-free guidance weight w, eps = (1 + w) eps(x, y) - w eps(x, null) (default 0)")
    few_shot = parser.add_argument_group("few-shot models (support set)")
    few_shot.add_argument("--support", nargs="+", default=None, metavar="PATH", help="support image files or folders of them")
    few_shot.add_argument("--dataset", default=None, help="take the support set from this dataset (default: the training one)")
    few_shot.add_argument("--root", default=None, metavar="DIR", help="dataset folder (omniglot)")
    few_shot.add_argument("--split", default=None, help="dataset split (default test)")
    few_shot.add_argument("--class-index", type=int, default=None, metavar="I", help="the class within the split (default 0)")
    few_shot.add_argument("--shot", type=int, default=None, metavar="K", help="support images of that class (default 5)")


DIFFUSION_OPTIONS = ("sampler", "steps", "eta", "guidance")


def diffusion_options(args, model) -> dict | None:
    """The ``--sampler/--steps/--eta/--guidance`` given on the command line (``sample`` and ``eval``),
    as keyword arguments for the model's sampling methods; None for a model that is not a diffusion
    model (one without a ``default_sampler``), which takes none of them. ``--steps`` needs DDIM."""
    options = {k: getattr(args, k) for k in DIFFUSION_OPTIONS if getattr(args, k, None) is not None}
    default_sampler = getattr(model, "default_sampler", None)
    if default_sampler is None:
        if options:
            raise ValueError(f"{' '.join('--' + k for k in options)}: only for diffusion models, but {args.checkpoint} holds {model.name!r}")
        return None
    if "steps" in options and options.get("sampler", default_sampler) != "ddim":
        raise ValueError("--steps chooses the number of DDIM steps: add --sampler ddim (the ancestral sampler runs all T steps)")
    return options


def load_support_images(paths) -> torch.Tensor:
    """Files or folders (their image files, sorted by name) -> ``(K, 1, 28, 28)`` in [0, 1], ink = 1."""
    from PIL import Image, UnidentifiedImageError

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"support folder {path} has no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no support image or folder at {path}")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS), dtype=np.float32) / 255
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read support image {file}: {err}") from None
        border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
        images.append(1 - pixels if border.mean() > 0.5 else pixels)
    return torch.from_numpy(np.clip(np.stack(images), 0, 1)).unsqueeze(1)


def grid_image(sections, scale: int = 3):
    """A PIL image of ``sections``, a list of ``(images (N, 1, H, W) in [0, 1], columns)`` stacked
    top to bottom with a gap between sections; dark ink on white, 1-pixel light grey lines."""
    from PIL import Image

    pad, gap, line = 1, 6, 200
    blocks = []
    for images, cols in sections:
        n, _, h, w = images.shape
        rows = -(-n // cols)
        block = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
        tiles = np.round(255 * (1 - images[:, 0].clamp(0, 1).cpu().numpy())).astype(np.uint8)
        for i, tile in enumerate(tiles):
            top, left = np.multiply(divmod(i, cols), (h + pad, w + pad))
            block[top : top + h + 2 * pad, left : left + w + 2 * pad] = line  # the tile's frame
            block[top + pad : top + pad + h, left + pad : left + pad + w] = tile
        blocks.append(block)
    width = max(b.shape[1] for b in blocks)
    canvas = np.full((sum(b.shape[0] for b in blocks) + gap * (len(blocks) - 1), width), 255, dtype=np.uint8)
    top = 0
    for block in blocks:
        canvas[top : top + block.shape[0], : block.shape[1]] = block
        top += block.shape[0] + gap
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST)


def _labels(args, n_classes: int) -> list[int]:
    if args.labels is not None:
        try:
            labels = [int(word) for word in args.labels.split(",") if word.strip()]
        except ValueError:
            raise ValueError(f"--labels must be comma-separated class indices like 0,1,2; got {args.labels!r}") from None
        if not labels or min(labels) < 0 or max(labels) >= n_classes:
            raise ValueError(f"--labels must be class indices in 0..{n_classes - 1}; got {args.labels!r}")
        return labels
    classes = min(8, n_classes) if args.classes is None else args.classes
    if not 1 <= classes <= n_classes:
        raise ValueError(f"--classes must be in 1..{n_classes} (the model's classes), got {classes}")
    return list(range(classes))


def _support(args, model) -> tuple[torch.Tensor, str]:
    if args.support is not None:
        if any(v is not None for v in (args.dataset, args.split, args.class_index, args.shot)):
            raise ValueError("give the support set either as --support files or as --dataset/--split/--class-index/--shot, not both")
        support = load_support_images(args.support)
        return support, f"{len(support)} support image(s) from {' '.join(args.support)}"
    from fsl_course.data import load

    name = args.dataset or model.training_info.get("dataset", "glyphs")
    split, index, shot = args.split or "test", args.class_index or 0, args.shot or 5
    dataset = load(name, split, root=args.root)
    if not 0 <= index < dataset.n_classes:
        raise ValueError(f"--class-index must be in 0..{dataset.n_classes - 1} for {name}/{split}, got {index}")
    if not 1 <= shot <= dataset.n_per_class:
        raise ValueError(f"--shot must be in 1..{dataset.n_per_class} for {name}/{split}, got {shot}")
    return dataset.images[index, :shot], f"{shot} support image(s) of {name}/{split} class {index} ({dataset.class_names[index]})"


def run(args) -> int:
    from fsl_course.cache import atomic_write
    from fsl_course.generative import load_model, model_kind

    if args.n < 1 or args.cols < 1 or args.scale < 1:
        raise ValueError("--n, --cols and --scale must be positive")
    model = load_model(args.checkpoint, device=args.device)
    kind = model_kind(model)
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]  # noqa: E731
    wrong = given("labels", "classes") if kind != "conditional" else []
    wrong += given("support", "dataset", "root", "split", "class_index", "shot") if kind != "few-shot" else []
    if wrong:
        holds = {"unconditional": "an unconditional", "conditional": "a class-conditional", "few-shot": "a few-shot"}[kind]
        raise ValueError(f"{' '.join(wrong)}: not used by {args.checkpoint}, which holds {holds} model ({model.name!r})")
    options = diffusion_options(args, model) or {}
    generator = torch.Generator().manual_seed(args.seed)
    loss = model.config["kwargs"].get("loss")  # GANs: nonsaturating or wgan-gp
    sections, what = [], f"{args.n} samples of {model.name} ({kind}{f', loss {loss}' if loss else ''})"
    if kind == "unconditional":
        sections.append((model.sample(args.n, generator=generator, **options), args.cols))
    elif kind == "conditional":
        labels = _labels(args, model.n_classes)
        y = torch.tensor([labels[i % len(labels)] for i in range(args.n)])
        sections.append((model.sample(y, generator=generator, **options), len(labels)))
        names = model.training_info.get("training", {}).get("class_names")
        what += ", one column per class: " + ", ".join(f"{y}" + (f" {names[y]}" if names else "") for y in labels)
    else:
        support, described = _support(args, model)
        sections += [(support, args.cols), (model.generate(support.to(model.device), args.n, generator=generator, **options), args.cols)]
        what += f" from {described} (first rows)"
    out = Path(args.out)
    with atomic_write(out) as tmp:
        grid_image(sections, args.scale).save(tmp, format="PNG")
    print(f"wrote {out}: {what}, seed {args.seed}" + "".join(f", {k} {v}" for k, v in options.items()))
    return 0
