"""``dicom-node demo-data OUTDIR``: synthetic paired radiographs in two vendor styles."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-data",
        help="write synthetic paired radiographs in two styles (A/, B/, test/A, test/B)",
        description="Procedural chest and knee phantoms, each exposure processed by two synthetic vendor "
        "styles (A: MONOCHROME1 'Alpha soft', B: MONOCHROME2 'Beta crisp'), written as DICOM CR files. "
        "Same file name in A/ and B/ = same exposure. See docs/demo-data.md.",
    )
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--count", type=int, default=24, help="training pairs (default 24)")
    p.add_argument("--test-count", type=int, default=6, help="held-out pairs in test/ (default 6)")
    p.add_argument("--size", type=int, default=1024, help="image rows and columns (default 1024, up to 4096)")
    p.add_argument("--seed", type=int, default=0, help="data set seed; same seed, same data (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from dicom_node.demo_data import write_demo_data

    t0 = time.perf_counter()
    manifest = write_demo_data(args.outdir, count=args.count, test_count=args.test_count, size=args.size,
                               seed=args.seed, progress=sys.stderr.isatty())
    print(f"wrote {manifest['count']} training and {manifest['test_count']} held-out pairs "
          f"({args.size}x{args.size}) to {args.outdir} in {time.perf_counter() - t0:.1f} s")
    return 0
