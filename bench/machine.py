"""What every benchmark records about the machine it ran on (one place for all bench scripts)."""
from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: "object | None" = None) -> dict:
    """CPU model, cores, torch threads, platform, load average and the GPU when ``device`` is CUDA."""
    import torch

    info: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "platform": platform.platform(), "gpu": None}
    dev = torch.device(device) if device is not None else None
    if dev is None and torch.cuda.is_available():
        dev = torch.device("cuda")
    if dev is not None and dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                       "bf16": torch.cuda.is_bf16_supported()}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def write_results(path: Path, args: argparse.Namespace, benchmark: str | None = None, **fields: object) -> None:
    """A benchmark's JSON file: its name, the date, the machine, its arguments (as text) and ``fields``."""
    head: dict = {"benchmark": benchmark} if benchmark else {}
    path.write_text(json.dumps({**head, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                **fields}, indent=1))
