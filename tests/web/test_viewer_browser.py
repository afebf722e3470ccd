"""The OHIF viewer in a real browser: Debian's headless chromium driven by Selenium (chromium-driver).

A study stored over DIMSE must show in the viewer's study list, and opening it
must paint the image: the viewport's screenshot is not flat (a viewport whose
frame requests fail is one flat colour). Screenshots are kept in the test's
tmp dir.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread

from tests.web.conftest import Web
from vna.web.viewer import DEFAULT_DIR

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("chromium / chromium-driver are missing: run `make system-deps`")
    if not (DEFAULT_DIR / "index.html").is_file():
        pytest.fail(f"the OHIF viewer is not prepared in {DEFAULT_DIR}: run `make install` (needs npm)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(shutil.which("chromedriver"))), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_viewer_lists_a_dimse_study_and_shows_its_image(web: Web, corpus: list[Path], browser: Any,
                                                        tmp_path: Path) -> None:
    from PIL import Image, ImageStat
    from selenium.webdriver.common.by import By

    ct = [p for p in corpus if p.name.startswith("ct-")][:3]
    r = subprocess.run(["storescu", "-aec", "VNA", "127.0.0.1", str(web.server.port), *map(str, ct)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ds = dcmread(ct[0], stop_before_pixels=True)
    study = str(ds.StudyInstanceUID)
    description = str(ds.StudyDescription)

    browser.get(f"{web.root}/")  # redirects to /viewer/
    _wait("the study in the study list",
          lambda: description in browser.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(tmp_path / "study-list.png"))
    assert "/viewer/" in browser.current_url

    browser.get(f"{web.root}/viewer/viewer?StudyInstanceUIDs={study}")

    def painted() -> float:
        canvases = browser.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas")
        if not canvases:
            return 0.0
        img = Image.open(io.BytesIO(canvases[0].screenshot_as_png)).convert("L")
        return float(ImageStat.Stat(img).stddev[0])

    std = _wait("the image in the viewport", lambda: painted() > 5.0 and painted())
    browser.save_screenshot(str(tmp_path / "viewer.png"))
    assert std > 5.0
    assert (tmp_path / "viewer.png").stat().st_size > 0
