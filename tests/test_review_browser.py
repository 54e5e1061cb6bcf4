"""``flywheel review`` in a real headless Chromium: the command serves, keys decide, the catalog records.

Drives Debian's /usr/bin/chromium through Debian's chromedriver (passed explicitly, so Selenium Manager
never downloads a browser or a driver).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                       reason="needs Debian chromium + chromium-driver: apt-get install chromium chromium-driver"),
]


@pytest.fixture
def server(review_project):
    """`flywheel review --port 0 --no-browser` as a real process; yields (url, project, ids)."""
    project, ids = review_project
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel", "-C", str(project.root), "review", "--port", "0", "--no-browser",
         "--reviewer", "browser-test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()  # "Review at http://127.0.0.1:PORT/  (Ctrl+C to stop)"
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"no URL from `flywheel review`: {line!r} {proc.stdout.read() if proc.poll() is not None else ''}"
        yield match.group(0), project, ids
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must never go online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _reviews(project) -> list[tuple]:
    return [tuple(r) for r in project.catalog.query(
        "SELECT image_id, decision, reviewer, COALESCE(reason, '') FROM reviews ORDER BY id")]


def test_review_by_keyboard_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, project, ids = server
    verdicts_before = project.catalog.query("SELECT * FROM verdicts ORDER BY id")
    wait = WebDriverWait(browser, 20)

    def press(keys: str) -> None:
        ActionChains(browser).send_keys(keys).perform()

    def state(image_id: int) -> str:
        return browser.find_element(By.ID, f"item-{image_id}").get_attribute("data-review")

    def count(name: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f'[data-count="{name}"]').text

    # 1. Open the page: the five reviewable images, oldest round first, each beside its source.
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    cards = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    order = [ids[n] for n in ("forest0", "sunset0", "forest1", "sunset2", "synth1")]
    assert cards == [str(i) for i in order]
    first = browser.find_element(By.ID, f"item-{ids['forest0']}")
    assert f"/image/{ids['src0']}/thumb" in first.get_attribute("innerHTML")  # its source is beside it
    assert "face:dlib_resnet_v1" in first.text and "identity kept; forest edit accepted" in first.text
    assert count("remaining") == "5"

    # 2. Accept the focused image, reject the next, undo the reject.
    press("a")
    wait.until(lambda d: state(ids["forest0"]) == "accepted")
    press("r")
    wait.until(lambda d: state(ids["sunset0"]) == "rejected" and count("remaining") == "3")
    press("u")
    wait.until(lambda d: state(ids["sunset0"]) == "" and count("remaining") == "4")

    # 3. Bulk: select the undone image and the next one with x, accept both with shift+A.
    press("x")
    press("j")
    press("x")
    assert browser.find_element(By.ID, "selected-count").text == "2"
    press("A")
    wait.until(lambda d: state(ids["sunset0"]) == state(ids["forest1"]) == "accepted" and count("remaining") == "2")
    assert (count("accepted"), count("rejected")) == ("3", "0")
    # Undo brings back the previous decision, not just "undecided": reject the focused accepted image, undo.
    press("r")
    wait.until(lambda d: state(ids["forest1"]) == "rejected")
    press("u")
    wait.until(lambda d: state(ids["forest1"]) == "accepted" and count("remaining") == "2")

    # 4. The catalog holds every decision, in order, with the reviewer; machine verdicts are untouched.
    deadline = time.monotonic() + 5
    while len(_reviews(project)) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reviews(project) == [
        (ids["forest0"], "accepted", "browser-test", ""),
        (ids["sunset0"], "rejected", "browser-test", ""),
        (ids["sunset0"], "cleared", "browser-test", "undo"),
        (ids["sunset0"], "accepted", "browser-test", ""),
        (ids["forest1"], "accepted", "browser-test", ""),
        (ids["forest1"], "rejected", "browser-test", ""),
        (ids["forest1"], "accepted", "browser-test", "undo"),
    ]
    assert [tuple(r) for r in project.catalog.query("SELECT * FROM verdicts ORDER BY id")] == \
        [tuple(r) for r in verdicts_before]

    # 5. Screenshot: a real, non-blank PNG of the page after reviewing.
    shot = tmp_path / "review.png"
    assert browser.save_screenshot(str(shot))
    from PIL import Image

    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 600
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # thumbnails, badges and text, not one flat colour
