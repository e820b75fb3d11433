"""Train the reference CycleGAN implementation itself on a demo data set, for bench/quality.py.

The reference (junyanz/pytorch-CycleGAN-and-pix2pix, a checkout outside this repository given
by ``--reference``) is driven exactly as in bench/train.py (``ReferenceStep``: its own
``CycleGANModel`` from an options namespace, ``set_input`` + ``optimize_parameters``), on the
same patches dicom-node's trainer would see: the engine's pixel pipeline and normalisation,
random crops of ``--patch`` px with random flips, A and B drawn independently.  Constant
learning rate (the budget is far below its 100 + 100 epochs).  Writes the A->B generator's
``state_dict`` to ``--out`` (tensors only).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent


def _reference_step_class():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module.ReferenceStep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="demo-data folder with A/ and B/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--ndf", type=int, default=16)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from quality import load_domain_arrays  # bench/ is on sys.path

    a, b = load_domain_arrays(args.data / "A"), load_domain_arrays(args.data / "B")
    ref = _reference_step_class()(args.reference, ngf=args.ngf, n_blocks=args.blocks, ndf=args.ndf,
                                  patch=args.patch, batch=1, device=torch.device("cpu"), seed=args.seed)
    rng = np.random.default_rng(args.seed)

    def crop(images: list[np.ndarray]) -> torch.Tensor:
        img = images[int(rng.integers(len(images)))]
        y = int(rng.integers(0, img.shape[0] - args.patch + 1))
        x = int(rng.integers(0, img.shape[1] - args.patch + 1))
        c = img[y:y + args.patch, x:x + args.patch]
        if rng.integers(2):
            c = c[:, ::-1]
        if rng.integers(2):
            c = c[::-1, :]
        return torch.from_numpy(np.ascontiguousarray(c))[None, None]

    for step in range(args.steps):
        losses = ref.step(crop(a), crop(b))
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    net = ref.model.netG_A
    state = {k.removeprefix("module."): v.detach().cpu() for k, v in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
