"""Load with real senders: 8 dcmtk storescu associations at once, 25 images each.

Why: a reading room's modalities send at the same time.  Concurrent associations share
one spool, one SQLite file and one worker; this proves that under that contention every
acknowledged image is translated and delivered, and none twice.  (Throughput and latency
numbers come from ``bench/load.py``; they are not asserted here.)
"""
from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import require_tool
from tests.factory import make_dataset, phantom, write
from tests.peers import NodeProcess, StoreSCP, acknowledged_sop_uids, tiny_node_config, wait_until

pytestmark = pytest.mark.interop

CALLED = "DR_KIM_STYLE"
SENDERS = 8
IMAGES = 12  # 96 images over 8 associations at once: enough to interleave them


def test_eight_concurrent_storescu_associations_all_delivered_once(tmp_path, tiny_model_path):
    exe = require_tool("storescu")
    archive = StoreSCP(tmp_path / "archive").start()
    config = tiny_node_config(tiny_model_path, {"archive": {"type": "dicom", "ae_title": archive.ae_title,
                                                            "host": "127.0.0.1", "port": archive.port}},
                              stable=1.0)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        batches: list[list[Path]] = []
        pixels = phantom(48, 40, 12, seed=7)
        for s in range(SENDERS):  # one study per modality
            study, series = generate_uid(), generate_uid()
            folder = tmp_path / f"modality{s}"
            folder.mkdir()
            batches.append([Path(write(make_dataset(pixels, study_uid=study, series_uid=series),
                                       folder / f"{i:02d}.dcm")) for i in range(IMAGES)])
        senders = [subprocess.Popen([exe, "-v", "-aet", f"CR_ROOM{s + 1}", "-aec", CALLED, "127.0.0.1",
                                     str(node.port), *map(str, files)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for s, files in enumerate(batches)]
        acked: set[str] = set()
        for proc, files in zip(senders, batches):
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-2000:]
            acked |= acknowledged_sop_uids(out, files)
        assert len(acked) == SENDERS * IMAGES

        wait_until(lambda: archive.store_requests() >= len(acked), timeout=240, interval=0.5,
                   message=f"{len(acked)} SC at storescp\n{node.log_tail()}")
        import time

        time.sleep(2.0)  # a duplicate delivery would arrive now
        assert archive.store_requests() == len(acked), "some SC was delivered more than once"
        refs = Counter()
        for path in archive.files():
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            refs[ds.SourceImageSequence[0].ReferencedSOPInstanceUID] += 1
        assert set(refs) == acked
        assert max(refs.values()) == 1
    finally:
        node.stop()
        archive.stop()
