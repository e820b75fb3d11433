"""DDP: two gloo CPU processes under torchrun train on different patches and end identical."""
from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys

import yaml
from factory import make_dataset, phantom, write

from dicom_node.engine import load_style_model
from dicom_node.train.export import load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    for d in ("A", "B"):
        (tmp_path / d).mkdir()
    for i in range(2):
        write(make_dataset(rows=80, cols=80, seed=i), tmp_path / "A" / f"a{i}.dcm")
        write(make_dataset(4095 - phantom(80, 80, 12, seed=5 + i), seed=5 + i), tmp_path / "B" / f"b{i}.dcm")
    cfg = {
        "data": {"a": "A", "b": "B"},
        "model": {"ngf": 8, "n_blocks": 2, "ndf": 8},
        # lambda_coarse: the loss on the network's coarse change (losses.coarse_change_loss) under DDP too
        "train": {"patch_size": 64, "steps": 6, "pool_size": 2, "threads": 1, "device": "cpu", "lambda_coarse": 1.0},
        "output": {"dir": "run", "sample_every": 3, "checkpoint_every": 3, "log_every": 3},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dicom_node", "train", "--config", "train.yaml", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: final weights sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(digests) == {"0", "1"}, proc.stderr[-3000:]
    assert digests["0"] == digests["1"]
    # rank 0 alone logged, checkpointed and exported
    assert proc.stderr.count("step 6/6") == 1
    model = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors")
    prov = model.metadata["provenance"]
    # exported from the run's best checkpoint (train/selection.py), one of the two rank 0 saved
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert prov["steps"] == best["step"] in (3, 6) and prov["data"]["world_size"] == 2
    assert re.search(r"wrote .*run_B2A.safetensors", proc.stdout)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    losses = [float(r["coarse"]) for r in rows if r["coarse"]]  # (validation rows hold no losses)
    assert losses and all(c > 0 for c in losses), rows  # the coarse loss did train
