#!/usr/bin/env python3
"""OpenTryOn-compatible ``bg_remove.py``: a thin shim over ``ben2q remove``.

    python bg_remove.py --mode single --image model.jpg --output_dir outputs [--refine]
    python bg_remove.py --mode batch --images a.jpg b.jpg c.jpg [--refine]

The output options of ``ben2q remove`` work here too, under the same names
(``--bg-color white --format jpg --crop --max-side 1000``, ``--alpha-only``, ``--mask``...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ben2q.cli import add_output_options, output_fields, run_remove, validated_options

    parser = argparse.ArgumentParser(description="Remove image backgrounds with BEN2.")
    parser.add_argument("--mode", choices=["single", "batch"], default="single")
    parser.add_argument("--image", help="path or URL (single mode)")
    parser.add_argument("--images", nargs="+", help="paths or URLs (batch mode)")
    parser.add_argument("--output_dir", default="ben2_outputs")
    parser.add_argument("--refine", action="store_true", help="refine foreground colours")
    parser.add_argument(
        "--mask", action="store_true", help="also write each output's matte as NAME.mask.png"
    )
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.mode == "single" and not args.image:
        parser.error("--mode single needs --image")
    if args.mode == "batch" and not args.images:
        parser.error("--mode batch needs --images")
    inputs = [args.image] if args.mode == "single" else args.images

    from ben2q.config import Settings

    options = validated_options(output_fields(args))
    if options is None:
        return 2
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_remove(
        inputs,
        output_dir=Path(args.output_dir),
        refine=args.refine,
        settings=settings,
        options=options,
        mask=args.mask,
    )


if __name__ == "__main__":
    sys.exit(main())
