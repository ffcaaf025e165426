"""report.html in a real headless browser (Debian's chromium through selenium and the system
chromedriver): no console errors, every video and image it references exists and decodes, and the
tables have a row per method and per method x prompt.

CI: ``apt-get update && apt-get install -y chromium chromium-driver`` and
``pip install -e ".[study]"`` (selenium comes with it)."""

import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from study import run_study

from .study_helpers import load_study, study_dir, write_fake_study

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="needs selenium: pip install -e '.[study]'")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout_s: float = 20.0):
    """Poll a JavaScript expression until it is truthy; its last value."""
    deadline = time.time() + timeout_s
    value = driver.execute_script(f"return {script}")
    while not value and time.time() < deadline:
        time.sleep(0.2)
        value = driver.execute_script(f"return {script}")
    return value


def test_report_page_loads_and_shows_every_run(tmp_path, browser):
    fake = str(tmp_path / "fake.yaml")
    methods = [{"name": "alpha", "config": fake},  # mp4 videos
               {"name": "beta", "config": fake, "overrides": ["video=gif", "fail_prompt=a chair"]}]
    run_study(load_study(write_fake_study(tmp_path, study={"methods": methods})))
    page = study_dir(tmp_path) / "report.html"
    browser.get(page.as_uri())

    videos = "Array.from(document.querySelectorAll('video'))"
    assert wait_for(browser, f"{videos}.every(v => v.readyState >= 2)")
    video_state = browser.execute_script(
        f"return {videos}.map(v => [v.src, v.readyState, v.videoWidth, v.error])")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth])")
    assert len(video_state) == 4  # alpha: 2 prompts x 2 seeds
    assert all(width == 32 and error is None for _, _, width, error in video_state)
    gifs = [src for src, _, _ in images if src.endswith(".gif")]
    plots = [src for src, _, _ in images if "/plots/" in src]
    assert len(gifs) == 2 and len(plots) == 5  # beta finished "a mug" only
    assert all(complete and width > 0 for _, complete, width in images)
    for src, *_ in video_state + images:  # relative links into the study folder
        path = Path(unquote(urlparse(src).path))
        assert path.is_file() and study_dir(tmp_path) in path.parents

    def rows(table_id):
        return browser.execute_script(
            f"return Array.from(document.querySelectorAll('#{table_id} tbody tr'))"
            ".map(r => Array.from(r.cells).map(c => c.textContent))")

    assert [r[0] for r in rows("per-method")] == ["alpha", "beta"]
    assert [r[:4] for r in rows("per-method-prompt")] == [
        ["alpha", "a mug", "2", "0"], ["alpha", "a chair", "2", "0"],
        ["beta", "a mug", "2", "0"], ["beta", "a chair", "0", "2"]]
    missing = browser.execute_script(
        "return Array.from(document.querySelectorAll('.missing')).map(d => d.textContent)")
    assert missing == ["failed", "failed"]
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_missing_video_is_detected(tmp_path, browser):
    """The checks above can fail: a video whose file is gone has a media error, and the
    browser logs the failed load."""
    run_study(load_study(write_fake_study(tmp_path, study={"prompts": ["a mug"], "seeds": [0]})))
    for video in study_dir(tmp_path).glob("runs/alpha/**/orbit.mp4"):
        shutil.move(video, video.with_suffix(".moved"))
    browser.get((study_dir(tmp_path) / "report.html").as_uri())
    assert wait_for(browser, "document.querySelector('video').error !== null")
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE"]
    assert any("orbit.mp4" in message for message in errors)
