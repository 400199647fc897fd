"""The ``ben2q`` command.

``ben2q remove IMAGE... [--output-dir DIR] [--refine]`` removes backgrounds locally with the
engine and writes one RGBA PNG per input, named after it. Every failed input gets a one-line
reason on stderr while the others still finish; the exit status is 1 if any input failed
and 2 if nothing could run (bad arguments, no weights).

Configuration comes from ``BEN2Q_*`` variables through ``Settings``; flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .config import Settings
from .errors import BEN2QError

EXIT_OK, EXIT_FAILED_ITEMS, EXIT_UNUSABLE = 0, 1, 2


def output_names(inputs: Sequence[str], output_dir: Path) -> list[Path]:
    """One ``<stem>.png`` per input in ``output_dir``; never two alike, never an input file.

    Later duplicates get ``_1``, ``_2``... so that ``a/x.jpg`` and ``b/x.jpg`` both survive.
    """
    taken: set[Path] = set()
    for item in inputs:
        if "://" not in item:
            taken.add(Path(item).resolve())
    names: list[Path] = []
    for item in inputs:
        stem = _stem(item)
        candidate = output_dir / f"{stem}.png"
        n = 0
        while candidate.resolve() in taken:
            n += 1
            candidate = output_dir / f"{stem}_{n}.png"
        taken.add(candidate.resolve())
        names.append(candidate)
    return names


def _stem(item: str) -> str:
    if item.startswith("data:"):
        return "image"
    path = unquote(urlsplit(item).path) if "://" in item else item
    stem = Path(path).stem.strip()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return safe or "image"


def run_remove(
    inputs: Sequence[str], *, output_dir: Path, refine: bool, settings: Settings
) -> int:
    """Remove backgrounds of ``inputs`` into ``output_dir``; returns the exit status."""
    from tqdm import tqdm

    from .engine import Engine
    from .imageio import load_image

    if not inputs:
        print("error: no input images given", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        engine = Engine.load(settings=settings)
    except BEN2QError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNUSABLE
    output_dir.mkdir(parents=True, exist_ok=True)
    targets = output_names(inputs, output_dir)
    failed = 0
    bar = tqdm(total=len(inputs), unit="img", disable=len(inputs) < 2, file=sys.stderr)
    for idx in engine.chunks(len(inputs)):
        loaded = []
        for i in idx:
            try:
                loaded.append((i, load_image(inputs[i], settings=settings)))
            except BEN2QError as exc:
                failed += 1
                bar.write(f"failed: {inputs[i]}: {exc.code}: {exc.message}", file=sys.stderr)
                bar.update(1)
        if not loaded:
            continue
        outputs = engine.remove_background([img for _, img in loaded], refine=refine)
        for (i, _), out in zip(loaded, outputs, strict=True):
            out.save(targets[i], format="PNG")
            bar.update(1)
    bar.close()
    done = len(inputs) - failed
    print(f"{done} of {len(inputs)} images written to {output_dir}", file=sys.stderr)
    return EXIT_FAILED_ITEMS if failed else EXIT_OK


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in (
            ("weights", getattr(args, "weights", None)),
            ("model_spec", getattr(args, "spec", None)),
            ("device", getattr(args, "device", None)),
            ("max_batch", getattr(args, "batch_size", None)),
        )
        if value is not None
    }
    return Settings(**overrides)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Flags that override ``BEN2Q_WEIGHTS``, ``BEN2Q_MODEL_SPEC``, ``BEN2Q_DEVICE``..."""
    parser.add_argument("--weights", help="checkpoint path (default: BEN2Q_WEIGHTS or the hub)")
    parser.add_argument("--spec", choices=["base", "tiny"], help="model variant")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ben2q", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    remove = sub.add_parser("remove", help="remove backgrounds of local files or URLs")
    remove.add_argument("images", nargs="+", help="paths or URLs")
    remove.add_argument("--output-dir", "-o", default="ben2_outputs", type=Path)
    remove.add_argument("--refine", action="store_true", help="refine foreground colours")
    add_engine_options(remove)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "remove":
        try:
            settings = _settings(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
        return run_remove(
            args.images, output_dir=args.output_dir, refine=args.refine, settings=settings
        )
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
