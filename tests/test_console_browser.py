"""The console in a real browser (Debian's chromium, driven by Playwright) against real peers.

An operator logs in with the link the node prints, watches a study sent with dcmtk
``storescu`` appear, opens it and sees its preview, finds its deliveries failed because the
PACS (dcmtk ``storescp``) was stopped, starts the PACS again, clicks Requeue and sees the
deliveries succeed; the PACS then holds the Secondary Captures.  Screenshots of each step
are kept in ``test-artifacts/console/`` (``DICOM_NODE_ARTIFACTS`` overrides the folder).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pydicom
import pytest

from tests.conftest import INTEROP, require_tool
from tests.factory import PATIENT_ID, PATIENT_NAME, write
from tests.peers import NodeProcess, StoreSCP, storescu, tiny_node_config, wait_until
from tests.test_node import study

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DICOM_NODE_ARTIFACTS", REPO / "test-artifacts")) / "console"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
TIMEOUT_MS = 60_000
SHOWN_NAME = "SECRET, PATIENT"  # factory.PATIENT_NAME as the console shows it


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if INTEROP:
            pytest.fail("playwright is required when DICOM_NODE_INTEROP=1 (pip install -e '.[test]')")
        pytest.skip("playwright not installed")
    return sync_playwright


def _loaded_images(page) -> int:
    return page.locator("img.preview").evaluate_all("imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")


def test_operator_requeues_a_failed_delivery_in_the_browser(tmp_path, tiny_model_path):
    chromium = require_tool("chromium")
    sync_playwright = _playwright()
    from playwright.sync_api import expect
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pacs = StoreSCP(out_dir=tmp_path / "pacs").start()
    config = tiny_node_config(tiny_model_path, {"pacs": {"type": "dicom", "ae_title": pacs.ae_title,
                                                         "host": "127.0.0.1", "port": pacs.port}},
                              stable=0.5, backoff=[0.3], max_attempts=2)
    config["web"] = {"port": 0, "refresh_seconds": 1}
    node = NodeProcess(tmp_path / "node", config).start()
    sources = study(2, size=96)
    files = [Path(write(ds, tmp_path / f"in{i}.dcm")) for i, ds in enumerate(sources)]
    try:
        login = re.search(r"log in with (http://127\.0\.0\.1:\d+/login\?token=\S+)", node.log_text()).group(1)
        base = login.split("/login")[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)

            page.goto(base + "/studies")  # not logged in: the login page, nothing of a patient
            assert page.url.startswith(base + "/login") and "SECRET" not in page.content()
            page.goto(login)  # the printed link logs in and lands on the overview
            assert page.url == base + "/" and page.locator("#models").inner_text().count("tiny")
            page.screenshot(path=str(ARTIFACTS / "1-overview.png"), full_page=True)

            pacs.stop()  # the PACS goes down: deliveries will fail
            page.goto(base + "/studies")
            sent = storescu(files, node.port, "DR_KIM_STYLE")
            assert sent.returncode == 0, sent.stderr
            page.wait_for_selector(f"#studies >> text={SHOWN_NAME}")  # appears by the live refresh
            assert PATIENT_ID in page.locator("#studies").inner_text()
            page.screenshot(path=str(ARTIFACTS / "2-studies.png"), full_page=True)

            page.click(f"#studies >> text={SHOWN_NAME}")
            expect(page.locator("tr.delivery.failed")).to_have_count(2, timeout=TIMEOUT_MS)
            wait_until(lambda: _loaded_images(page) == 2, 30, message="both previews shown")
            page.screenshot(path=str(ARTIFACTS / "3-study-failed.png"), full_page=True)

            page.click("text=Failures")
            failed = page.locator("#failed-deliveries").inner_text()
            assert failed.count("pacs") == 2 and "cannot connect" in failed, failed
            page.screenshot(path=str(ARTIFACTS / "4-failures.png"), full_page=True)

            pacs.start()  # back on the same port
            page.click("#requeue-all")
            page.wait_for_selector("#done >> text=requeued 2 deliveries")
            expect(page.locator("#failed-deliveries")).to_contain_text("None.", timeout=TIMEOUT_MS)
            page.goto(base + f"/studies/{sources[0].StudyInstanceUID}")
            expect(page.locator("tr.delivery.delivered")).to_have_count(2, timeout=TIMEOUT_MS)
            page.screenshot(path=str(ARTIFACTS / "5-delivered.png"), full_page=True)
            page.click("button.reprocess")  # translate the delivered study again: a new version
            page.wait_for_selector("#done >> text=queued for translation again: 2 instance(s)")
            wait_until(lambda: len(pacs.files()) == 4, 60, message="the reprocessed SCs at the PACS")

            page.goto(base + "/")
            expect(page.locator("#destinations")).to_contain_text("s ago")  # the last success
            page.screenshot(path=str(ARTIFACTS / "6-overview.png"), full_page=True)

            page.click("text=Operator log")
            assert "requeue" in page.locator("#actions").inner_text()
            assert "reprocess" in page.locator("#actions").inner_text()
            page.screenshot(path=str(ARTIFACTS / "7-operator-log.png"), full_page=True)
            browser.close()
        wait_until(lambda: len(pacs.files()) == 4, 30, message="4 SCs at the PACS (2 reprocessed)")
        arrived = [pydicom.dcmread(f, stop_before_pixels=True) for f in pacs.files()]
        assert {str(ds.SOPClassUID) for ds in arrived} == {SC_STORAGE}
        assert {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in arrived} == \
            {str(ds.SOPInstanceUID) for ds in sources}
        log = node.log_text()
        assert PATIENT_NAME not in log and PATIENT_ID not in log
    finally:
        node.stop()
        pacs.stop()
