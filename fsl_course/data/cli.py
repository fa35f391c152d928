"""``fsl-course data list`` and ``fsl-course data show NAME --split S --out grid.png``."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{list,show}", required=True)
    sub.add_parser("list", help="the datasets, their splits and sizes")
    show = sub.add_parser("show", help="save a grid of classes (rows) x instances (columns) as a PNG")
    show.add_argument("name", help="glyphs, digits or omniglot")
    show.add_argument("--split", default="train", help="train, val or test (default: train)")
    show.add_argument("--root", default=None, help="dataset folder (omniglot)")
    show.add_argument("--classes", type=int, default=10, help="rows: classes drawn at random (default 10)")
    show.add_argument("--instances", type=int, default=10, help="columns: instances per class (default 10)")
    show.add_argument("--seed", type=int, default=0, help="which classes (default 0)")
    show.add_argument("--scale", type=int, default=3, help="pixels per image pixel in the PNG (default 3)")
    show.add_argument("--out", required=True, help="output PNG path")


def run(args) -> int:
    from fsl_course.data import DATASETS, SPLITS, load

    if args.data_command == "list":
        for name, description in DATASETS.items():
            print(f"{name}: {description}")
            if name == "omniglot":
                print("    (needs --root DIR)")
                continue
            for split in SPLITS:
                d = load(name, split)
                print(f"    {split:5s} {d.n_classes:5d} classes x {d.n_per_class} instances, {len(d.alphabet_names)} alphabet(s)")
        return 0
    from PIL import Image

    dataset = load(args.name, args.split, root=args.root)
    grid = dataset.grid(args.classes, args.instances, seed=args.seed)
    pixels = ((1 - grid) * 255).round().byte().numpy()  # dark ink on white paper
    image = Image.fromarray(pixels).resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.Resampling.NEAREST)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}: {min(args.classes, dataset.n_classes)} classes x {min(args.instances, dataset.n_per_class)} instances of {dataset}")
    return 0
