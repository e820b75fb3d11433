"""Hostile or careless data sets (issue 24): deflate bombs, images too large to process, a full
spool, corrected resends.  Each is refused with a status, or processed, without exhausting the node.

Real nodes on 127.0.0.1 (in process, or ``dicom-node serve`` as a subprocess where its memory or
temp folder is measured), real associations, real filesystems (a tmpfs where root may mount one).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.node import Node
from tests.factory import make_dataset
from tests.nodeproc import node_config, send
from tests.test_hostile_input import CALLED, make_node

# -- items 1 and 2: Deflated Explicit VR Little Endian ---------------------------------------------


def _send_watching(port: int, path: Path, watch) -> int:
    """C-STORE ``path`` as it is while ``watch()`` samples the disk every 2 ms; the status."""
    import threading

    from pydicom.uid import ExplicitVRLittleEndian

    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            watch()
            time.sleep(0.002)

    watcher = threading.Thread(target=loop)
    watcher.start()
    try:
        return send_file_as_is(port, path, ExplicitVRLittleEndian)
    finally:
        done.set()
        watcher.join()

def test_small_deflated_image_is_accepted_and_translated(tmp_path, tiny_model_path):
    """A correctly written deflated image (offsets in the inflated stream are past the compressed size)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.factory import encode_as
    from tests.nodeproc import folder_uids, wait_for

    node = make_node(tmp_path, tiny_model_path)
    with node:
        ds = encode_as(make_dataset(rows=96, cols=80), DeflatedExplicitVRLittleEndian)
        assert send(node.port, [ds], called=CALLED, native_only=True) == [0]
        assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 1, 30)
        assert wait_for(lambda: {r.state for r in node.db.instances()} == {"delivered"}, 10)


def deflate_bomb(path: Path, inflated_pixel_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian CR file whose Pixel Data inflates to
    ``inflated_pixel_bytes`` zeros (consistent Rows x Columns x 16 bit): a few hundred KB on the wire."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = inflated_pixel_bytes // 2
    cols = 16384
    ds = make_dataset(rows=8, cols=8)
    del ds.PixelData
    ds.Rows, ds.Columns = pixels // cols, cols
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)  # explicit VR little endian (no file meta)
    body = header.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", ds.Rows * cols * 2)
    meta = ds.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta)
        out.write(packer.compress(body))
        for _ in range(ds.Rows * cols * 2 >> 20):
            out.write(packer.compress(zeros))
        out.write(packer.flush())
    return path


def send_file_as_is(port: int, path: Path, syntax: str) -> int:
    """C-STORE a file's bytes as they are on disk (chunked sending); returns the status (-1: none)."""
    from pynetdicom import AE, _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(rsp.Status) if rsp and "Status" in rsp else -1


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path, tiny_model_path):
    """256 MiB of zeros deflated to ~0.3 MB: refused at max_instance_bytes of *inflated* data,
    the node's peak memory grows by less than 64 MiB (pydicom inflated it whole: +512 MiB)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.peers import NodeProcess, tiny_node_config

    config = tiny_node_config(tiny_model_path, {"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}})
    config["node"]["max_instance_bytes"] = 16 * 1024 * 1024
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 256 * 1024 * 1024)
    assert bomb.stat().st_size < 1024 * 1024
    node = NodeProcess(tmp_path / "node", config)
    node.start()
    try:
        small = tmp_path / "small.dcm"
        from tests.factory import encode_as, write

        write(encode_as(make_dataset(rows=64, cols=64), DeflatedExplicitVRLittleEndian), small)
        assert send_file_as_is(node.port, small, DeflatedExplicitVRLittleEndian) == 0  # warm: parser loaded
        before = peak_rss(node.proc.pid)
        status = send_file_as_is(node.port, bomb, DeflatedExplicitVRLittleEndian)
        growth = peak_rss(node.proc.pid) - before
        assert status == 0xA700, f"status 0x{status:04X}"
        assert growth < 64 * 1024 * 1024, f"peak memory grew by {growth / 2**20:.0f} MiB"
        assert "inflated data set larger than max_instance_bytes" in node.log_text()
        assert node.alive
        assert list((tmp_path / "node" / "spool" / "tmp").iterdir()) == []  # no inflated leftovers
    finally:
        node.stop()


# -- item 5: a full spool --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem (tmpfs) to fill: free space is what the kernel says, nothing faked.
    Needs root (mount); skipped otherwise."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_to(disk: Path, free: int) -> None:
    """Write a filler file so that ``free`` bytes stay free on ``disk``."""
    import os
    import shutil

    excess = shutil.disk_usage(disk).free - free
    with open(disk / "filler", "ab") as f:
        while excess > 0:
            n = min(excess, 1 << 20)
            f.write(bytes(n))
            excess -= n
        f.flush()
        os.fsync(f.fileno())


def test_big_instance_into_a_nearly_full_spool_is_refused_before_the_disk_fills(tmp_path, tiny_model_path,
                                                                                 small_disk):
    """60 MB into 12 MB of free spool: 0xA700 on a usable association, the disk never below
    min_free_bytes minus one check's worth, and the next small instance is stored."""
    import shutil

    import numpy as np

    from tests.factory import write
    from tests.peers import NodeProcess, tiny_node_config

    config = tiny_node_config(tiny_model_path, {"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}})
    config["storage"] = {"spool_dir": str(small_disk / "spool"), "min_free_bytes": 2 * 1024 * 1024}
    big = write(make_dataset(np.full((5472, 5472), 1000, dtype=np.uint16)), tmp_path / "big.dcm")
    assert Path(big).stat().st_size > 59_000_000
    node = NodeProcess(tmp_path / "node", config)
    node.start()
    lowest = [shutil.disk_usage(small_disk).free]

    def watch() -> None:
        lowest[0] = min(lowest[0], shutil.disk_usage(small_disk).free)

    try:
        fill_to(small_disk, 12 * 1024 * 1024)
        status = _send_watching(node.port, Path(big), watch)
        assert status == 0xA700, f"status 0x{status:04X}"
        assert lowest[0] > 1024 * 1024, f"free disk went down to {lowest[0]} bytes"
        assert "disk full while receiving" in node.log_text()
        assert send(node.port, [make_dataset(rows=32, cols=32)], called=CALLED) == [0]  # space came back
        assert "disk is full" not in node.log_text() and node.alive
    finally:
        node.stop()


def test_a_claim_whose_commit_fails_on_a_full_disk_is_not_kept_in_hand(small_disk):
    """The disk fills between the claim's UPDATE and its COMMIT: the instance is not this node's,
    so the heartbeat must not hold it (it stayed 'in hand' and leased for minutes, until a restart)."""
    from tests.test_cluster import T, node, ready

    db = node(small_disk / "state.db", "a", exclusive=True)
    try:
        ids = ready(db, 2)
        fill_to(small_disk, 0)
        with pytest.raises(Exception, match="full"):
            db.claim_ready(now=T)
        assert db.cluster._held["instances"] == set()  # the items the heartbeat renews
        (small_disk / "filler").unlink()
        assert db.claim_ready(now=T + 1).id == ids[0]  # claimable at once, not after a lease
        assert db.cluster._held["instances"] == {ids[0]}
    finally:
        db.close()


# -- item 3: a decode memory budget per image --------------------------------------------------

def rle_flat_image(rows: int, cols: int, value: int = 1000):
    """A 16-bit RLE Lossless CR of one grey value: 2 segments of 128-byte replicate runs, so
    8000x8000 is about 1 MB on the wire (and 64 Mpixel, within the engine's pixel limit)."""
    import struct

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    count = rows * cols
    assert count % 128 == 0
    segments = [bytes([0x81, (value >> 8) & 0xFF]) * (count // 128), bytes([0x81, value & 0xFF]) * (count // 128)]
    header = struct.pack("<16I", 2, 64, 64 + len(segments[0]), *([0] * 13))
    ds = make_dataset(rows=8, cols=8)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = encapsulate([header + segments[0] + segments[1]])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def test_an_image_too_large_to_process_is_refused_at_c_store(tmp_path, tiny_model_path):
    """An RLE image of ~1 MB declaring 8000x8000 needs ~7.6 GiB to process (the default budget is
    6 GiB): 0xA700 at once, and the study sent after it is translated without waiting behind it;
    node.max_decode_bytes lowers the budget."""
    from tests.nodeproc import folder_uids, wait_for

    node = make_node(tmp_path, tiny_model_path)
    with node:
        t0 = time.monotonic()
        assert send(node.port, [rle_flat_image(8000, 8000)], called=CALLED, native_only=True) == [0xA700]
        assert time.monotonic() - t0 < 10
        assert send(node.port, [make_dataset(rows=64, cols=64)], called=CALLED) == [0]
        assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 1, 30)
    small = make_node(tmp_path / "small", tiny_model_path, node={"max_decode_bytes": 1024 * 1024})
    with small:  # 128 bytes per pixel: 96x96 needs 1.1 MiB, 64x64 0.5 MiB
        assert send(small.port, [make_dataset(rows=96, cols=96), make_dataset(rows=64, cols=64)],
                    called=CALLED) == [0xA700, 0]


def test_the_worker_checks_the_budget_again_before_decoding():
    """What was queued under a larger budget (a restart with a lower one): refused before any
    pixel is decoded."""
    from dicom_node.engine.dicom_decode import decode_dataset
    from dicom_node.engine.errors import UnsupportedImage

    ds = make_dataset(rows=96, cols=96)
    with pytest.raises(UnsupportedImage, match="too large to process"):
        decode_dataset(ds, max_bytes=1024 * 1024)
    assert decode_dataset(ds, max_bytes=2 * 1024 * 1024).pixels.shape == (96, 96)


def test_receiving_stops_at_the_watermark_without_root(tmp_path, tiny_model_path):
    """The same without a small filesystem: storage.min_free_bytes set 12 MiB below the spool
    disk's free space.  The 60 MB instance is cut off while it arrives (its temp file never
    holds more than a few MiB), not refused after all of it was written."""
    import shutil

    import numpy as np

    from tests.factory import write
    from tests.peers import NodeProcess, tiny_node_config

    big = write(make_dataset(np.full((5472, 5472), 1000, dtype=np.uint16)), tmp_path / "big.dcm")
    spool = tmp_path / "node" / "spool"
    spool.mkdir(parents=True)
    config = tiny_node_config(tiny_model_path, {"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}})
    config["storage"] = {"spool_dir": str(spool),
                         "min_free_bytes": shutil.disk_usage(spool).free - 12 * 1024 * 1024}
    node = NodeProcess(tmp_path / "node", config)
    node.start()
    largest = [0]

    def watch() -> None:
        for f in (spool / "tmp").glob("*"):
            try:
                largest[0] = max(largest[0], f.stat().st_size)
            except OSError:
                pass

    try:
        status = _send_watching(node.port, Path(big), watch)
        assert status == 0xA700, f"status 0x{status:04X}"
        assert "disk full while receiving" in node.log_text()
        assert largest[0] < 20 * 1024 * 1024, f"{largest[0]} bytes written before the refusal"
    finally:
        node.stop()


# -- item 8: a corrected resend while the first content is being translated --------------------

def test_a_corrected_resend_during_the_translation_wins(tmp_path):
    """The resend arrives while the old content is translated (a ~1024² image with a slower
    model): that translation's result is dropped, and what the PACS holds last is the corrected
    SC under the same UIDs, made from revision 1."""
    import copy

    from dicom_node.engine import new_style_model, save_style_model
    from tests.nodeproc import Receiver, wait_for

    model = save_style_model(new_style_model(ngf=16, n_blocks=4, residual=True, seed=3),
                             tmp_path / "slow.safetensors", name="slow", version="1")
    with Receiver("PACS") as pacs:
        raw = node_config(tmp_path, port=11112, model_path=model,
                          destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                 "port": pacs.port}},
                          routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["pacs"]}], stable=0.2)
        config = parse_config(raw, base_dir=tmp_path)
        config.node.port = 0
        node = Node(config)
        with node:
            first = make_dataset(rows=1024, cols=1024)
            assert send(node.port, [first], called=CALLED) == [0]
            assert wait_for(lambda: [r.state for r in node.db.instances()] == ["ready"], 10)
            time.sleep(0.5)  # claimed: the translation of the first content is under way
            corrected = copy.deepcopy(first)
            corrected.PatientName = "CORRECTED^NAME"
            assert send(node.port, [corrected], called=CALLED) == [0]
            assert wait_for(lambda: [r.state for r in node.db.instances()] == ["delivered"]
                            and pacs.received and str(pacs.received[-1].PatientName) == "CORRECTED^NAME", 90)
            (audit,) = node.db.audit.rows()
            assert audit["source_revision"] == 1
            assert {str(ds.SOPInstanceUID) for ds in pacs.received} == {audit["output_sop_uid"]}
            assert [str(ds.PatientName) for ds in pacs.received][-1:] == ["CORRECTED^NAME"]
