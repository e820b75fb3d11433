"""How long the ``dicom-node`` command takes to start: ``--help``, ``status``, ``check-config``.

Whole processes timed from outside (start to exit, interpreter start-up and imports included),
as an operator meets them.  The same three commands run on two trees in turn, A B A B ... (a
drifting machine moves both alike), after one warm-up run each:

- ``after``: the installed package (this working tree);
- ``before``: the tree at ``--before REV`` (default: the last commit before issue 25's CLI
  work, whose ``status`` and ``check-config`` imported torch to resolve the bundled model's
  name), unpacked with ``git archive`` into a temporary folder and run with it first on
  ``PYTHONPATH``.

``status`` runs on the embedded config (``./spool`` of a temporary folder holding a state
database) and on a config file routing to the bundled model ``default`` (the same spool), as
does ``check-config``.  Prints a
table last and writes bench/results/cli.json (medians, every raw run, whether torch was
imported).

    .venv/bin/python bench/cli.py [--runs 7] [--before REV]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "840e17b"  # the tree before issue 25's CLI work
COMMANDS = {"--help": ["--help"], "status": ["status"], "status --config": ["status", "--config", "node.yaml"],
            "check-config": ["check-config", "node.yaml"]}
CONFIG = """\
node: {ae_title: DICOMNODE, host: 127.0.0.1, port: 11112}
storage: {spool_dir: ./spool}
models:
  default: {path: default}
destinations:
  outbox: {type: folder, path: ./outbox}
routes:
  - {called_ae: DEFAULT_STYLE, model: default, destinations: [outbox]}
"""
# Runs the command's main as the console script does, then says whether torch got imported.
PROBE = ("import sys\nfrom dicom_node.cli import main\n"
         "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
         "sys.stderr.write('\\nTORCH %d RC %s\\n' % ('torch' in sys.modules, rc))\n")


def unpack(rev: str, into: Path) -> Path:
    """The package of ``rev`` as an importable tree (engine/ and train/ as dicom_node.engine/.train)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("engine", "train"):
        (into / "dicom_node" / name).symlink_to(into / name, target_is_directory=True)
    return into


def run_once(args: list[str], cwd: Path, pythonpath: Path | None, probe: bool = False) -> tuple[float, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    else:
        env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, "-m", "dicom_node", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if done.returncode != 0 and not probe:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall, done.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per command and tree (default 7)")
    ap.add_argument("--before", default=BEFORE, help=f"the tree to compare with (default {BEFORE})")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "cli.json"), help="result JSON")
    args = ap.parse_args()

    from dicom_node.state import StateDB

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp_path = Path(tmp)
        work = tmp_path / "work"
        (work / "spool").mkdir(parents=True)
        (work / "node.yaml").write_text(CONFIG)
        StateDB(work / "spool" / "state.db").close()
        trees = {"before": unpack(args.before, tmp_path / "before"), "after": None}
        torch_imported = {tree: {name: "TORCH 1" in run_once(cmd, work, path, probe=True)[1]
                                 for name, cmd in COMMANDS.items()} for tree, path in trees.items()}
        walls: dict[str, dict[str, list[float]]] = {t: {n: [] for n in COMMANDS} for t in trees}
        for name, cmd in COMMANDS.items():
            for tree, path in trees.items():  # warm-up: file caches, .pyc files
                run_once(cmd, work, path)
            for _ in range(args.runs):
                for tree, path in trees.items():
                    walls[tree][name].append(run_once(cmd, work, path)[0])

    rows = []
    for name in COMMANDS:
        before, after = (statistics.median(walls[t][name]) for t in ("before", "after"))
        ratios = [a / b for a, b in zip(walls["after"][name], walls["before"][name])]
        rows.append({"command": f"dicom-node {name}", "before_s": round(before, 3), "after_s": round(after, 3),
                     "ratio_after_before": round(statistics.median(ratios), 3),
                     "torch_before": torch_imported["before"][name], "torch_after": torch_imported["after"][name]})
    import torch

    import dicom_node

    result = {"bench": "cli", "machine": machine_info("cpu"),
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "dicom_node": dicom_node.__version__},
              "before_rev": args.before,
              "method": "whole process wall time (python -m dicom_node ...), median of --runs after one warm-up, "
                        "before and after in turn; ratio: median of the pairwise ratios",
              "runs": args.runs, "results": rows, "raw_wall_s": walls}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"{'command':<26} {'before s':>9} {'after s':>9} {'after/before':>13}  torch before -> after")
    for r in rows:
        print(f"{r['command']:<26} {r['before_s']:>9.3f} {r['after_s']:>9.3f} {r['ratio_after_before']:>13.2f}  "
              f"{'yes' if r['torch_before'] else 'no'} -> {'yes' if r['torch_after'] else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
