"""``dicom-node demo-data OUTDIR``: synthetic radiographs in two vendor styles, paired or unpaired."""
from __future__ import annotations

import argparse

from . import add_output


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo-data",
        help="write synthetic radiographs in two styles, paired or --unpaired (A/, B/, test/A, test/B)",
        description="Procedural chest and knee phantoms, each exposure processed by two synthetic vendor "
        "styles (default pair 'classic': A MONOCHROME1 'Alpha soft', B MONOCHROME2 'Beta crisp'), written "
        "as DICOM CR files. Paired (default): same file name in A/ and B/ = same exposure. --unpaired: A/ "
        "and B/ hold disjoint phantoms (aNNNN_*, bNNNN_*); true pairs only in test/. The nonlinear pairs "
        "(multiscale, clahe, denoise, unsharp, combined) process absolute values as vendors do; --source real "
        "cuts them from crops of varying field of view of real CR radiographs. See docs/demo-data.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output(p, "output folder (created)", dest="outdir", required=True, positional=True, aliases=())
    p.add_argument("--count", type=int, default=24,
                   help="training pairs, or with --unpaired images per style (default 24)")
    p.add_argument("--test-count", type=int, default=6, help="held-out true pairs in test/ (default 6)")
    p.add_argument("--size", type=int, default=1024, help="image rows and columns (default 1024, up to 4096)")
    p.add_argument("--seed", type=int, default=0, help="data set seed; same seed, same data (default 0)")
    p.add_argument("--unpaired", action="store_true",
                   help="A/ and B/ from disjoint exposures (A: phantoms 0..count-1, B: count..2*count-1); "
                   "test/ keeps true pairs (phantoms 2*count..) for scoring")
    style_pair = p.add_argument("--style-pair", metavar="NAME", help="the two vendor styles (listed in --help)")
    p.add_argument("--source", default="phantom", choices=("phantom", "real"),
                   help="phantom: procedural chests and knees (default); real: crops of varying size, position "
                   "and collimation of pydicom-data's real CR chest and leg (A, B and test from disjoint "
                   "regions; --size is the largest crop side; needs the pydicom-data package)")
    p.set_defaults(func=run)

    def format_help() -> str:
        """The style pairs come from the demo generators, imported only for this help: every
        ``dicom-node`` command builds this parser, and none but demo-data needs them (numpy)."""
        from dicom_node.demo.vendor_processing import DEFAULT_STYLE_PAIR, STYLE_PAIRS

        style_pair.help = (f"the two vendor styles: {', '.join(STYLE_PAIRS)} (default {DEFAULT_STYLE_PAIR}; "
                           "listed below)")
        pairs = "\n".join(f"  {name:<10} {pair.description}" for name, pair in STYLE_PAIRS.items())
        p.epilog = f"style pairs (--style-pair):\n{pairs}"
        return argparse.ArgumentParser.format_help(p)

    # argparse has no hook for help text made on demand: this one parser's method is replaced
    p.format_help = format_help  # type: ignore[method-assign]  # argparse (stdlib) offers no other way


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from dicom_node.demo.vendor_processing import DEFAULT_STYLE_PAIR
    from dicom_node.demo.writer import write_demo_data

    args.style_pair = args.style_pair or DEFAULT_STYLE_PAIR
    t0 = time.perf_counter()
    manifest = write_demo_data(args.outdir, count=args.count, test_count=args.test_count, size=args.size,
                               seed=args.seed, progress=sys.stderr.isatty(), unpaired=args.unpaired,
                               style_pair=args.style_pair, source=args.source)
    if args.unpaired:
        what = (f"{manifest['count']} unpaired training images per style and {manifest['test_count']} "
                "held-out pairs")
    else:
        what = f"{manifest['count']} training and {manifest['test_count']} held-out pairs"
    shape = f"{args.size}x{args.size}" if args.source == "phantom" else f"real crops up to {args.size} px"
    print(f"wrote {what} ({shape}, {'unpaired' if args.unpaired else 'paired'}, style pair "
          f"{args.style_pair}) to {args.outdir} in {time.perf_counter() - t0:.1f} s")
    return 0
