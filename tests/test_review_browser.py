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

    # 1. Open the page on every image (the bare page shows only what needs a human): the five reviewable
    #    images, oldest round first, each beside its source.
    browser.get(url + "?verdict=&review=")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    cards = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    order = [ids[n] for n in ("forest0", "sunset0", "forest1", "sunset2", "synth1")]
    assert cards == [str(i) for i in order]
    first = browser.find_element(By.ID, f"item-{ids['forest0']}")
    assert f"/image/{ids['src0']}/thumb" in first.get_attribute("innerHTML")  # its source is beside it
    assert "identity: face distance 0.31 (accept ≤ 0.60)" in first.text
    assert "identity kept; forest edit accepted" in first.text
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


def _ready(browser, wait) -> None:
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def _wait_rows(project, n: int, table: str = "reviews") -> None:
    deadline = time.monotonic() + 10
    while project.catalog.query(f"SELECT COUNT(*) FROM {table}")[0][0] < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_captions_range_select_and_filter_actions_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, project, ids = server
    wait = WebDriverWait(browser, 20)

    def press(*keys) -> None:
        ActionChains(browser).send_keys(*keys).perform()

    def card(name: str):
        return browser.find_element(By.ID, f"item-{ids[name]}")

    def caption_of(name: str) -> str:
        return card(name).find_element(By.CSS_SELECTOR, '[data-role="caption"]').text

    def captions_of(name: str) -> list[tuple]:
        return [tuple(r) for r in project.catalog.query(
            "SELECT source, text FROM captions WHERE image_id = ? ORDER BY id", (ids[name],))]

    browser.get(url + "?verdict=&review=")
    _ready(browser, wait)

    # 1. Caption: c opens the focused card's caption, typing never triggers the grid's keys (the text is
    #    full of a, r, s, u, x, j, k), Enter saves one cleaned line with the trigger word.
    press("c")
    area = card("forest0").find_element(By.TAG_NAME, "textarea")
    wait.until(lambda d: area.is_displayed() and d.switch_to.active_element == area)
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).perform()  # replace it all
    press("a rainy harbour, jukebox lights, dusk")
    press(Keys.ENTER)
    wait.until(lambda d: caption_of("forest0") == "fw_test, a rainy harbour, jukebox lights, dusk")
    assert captions_of("forest0") == [("template", "fw_test in a forest"),
                                      ("human", "fw_test, a rainy harbour, jukebox lights, dusk")]
    assert card("forest0").find_element(By.CSS_SELECTOR, '[data-role="caption-source"]').text == "human"
    assert project.catalog.query("SELECT COUNT(*) FROM reviews")[0][0] == 0  # no key reached the grid
    # Esc cancels: nothing is written.
    press("c")
    wait.until(lambda d: d.switch_to.active_element == area)
    press(" and more")
    press(Keys.ESCAPE)
    wait.until(lambda d: not area.is_displayed())
    assert len(captions_of("forest0")) == 2 and caption_of("forest0").endswith("dusk")
    # The enlarged view shows the caption.
    press(Keys.ENTER)
    overlay_caption = browser.find_element(By.ID, "overlay-caption")
    wait.until(lambda d: "rainy harbour" in overlay_caption.text and "(human)" in overlay_caption.text)
    press(Keys.ENTER)

    # 2. Range select: shift+→ twice from the first card, then shift-click the fifth adds it; R rejects them.
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).key_up(Keys.SHIFT).perform()
    assert browser.find_element(By.ID, "selected-count").text == "3"
    fifth = card("synth1").find_element(By.CSS_SELECTOR, "button.select")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", fifth)
    ActionChains(browser).key_down(Keys.SHIFT).click(fifth).key_up(Keys.SHIFT).perform()  # anchor (1st) to 5th
    assert browser.find_element(By.ID, "selected-count").text == "5"
    toggle = card("sunset2").find_element(By.CSS_SELECTOR, "button.select")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", toggle)  # not under the sticky header
    toggle.click()  # unselect one
    assert browser.find_element(By.ID, "selected-count").text == "4"
    press("R")
    picked = [ids[n] for n in ("forest0", "sunset0", "forest1", "synth1")]
    _wait_rows(project, 4)
    assert [tuple(r) for r in project.catalog.query("SELECT image_id, decision FROM reviews ORDER BY id")] == \
        [(i, "rejected") for i in picked]

    # 3. Accept the whole filter: the confirmation names the count; Enter confirms; one row per image.
    browser.get(url + "?verdict=&review=&kind=enriched")
    _ready(browser, wait)
    browser.find_element(By.CSS_SELECTOR, '[data-filter-action="accepted"]').click()
    dialog = browser.find_element(By.ID, "confirm-text")
    wait.until(lambda d: dialog.is_displayed())
    assert dialog.text == "Accept all 4 images in this filter?"
    press(Keys.ENTER)
    enriched = [ids[n] for n in ("forest0", "sunset0", "forest1", "sunset2")]
    _wait_rows(project, 8)
    assert [tuple(r) for r in project.catalog.query(
        "SELECT image_id, decision, reviewer FROM reviews WHERE id > 4 ORDER BY id")] == \
        [(i, "accepted", "browser-test") for i in enriched]
    wait.until(lambda d: all(card(n).get_attribute("data-review") == "accepted"
                             for n in ("forest0", "sunset0", "forest1", "sunset2")))
    # u undoes the whole filter action: each image gets its own previous decision back.
    press("u")
    _wait_rows(project, 12)
    assert [tuple(r) for r in project.catalog.query(
        "SELECT image_id, decision, reason FROM reviews WHERE id > 8 ORDER BY decision, image_id")] == sorted(
        [(ids["sunset2"], "cleared", "undo")] + [(i, "rejected", "undo") for i in picked if i != ids["synth1"]],
        key=lambda r: (r[1], r[0]))
    # X selects every image of the filter; A asks before deciding them all, and Esc cancels.
    press("X")
    press("A")
    wait.until(lambda d: dialog.is_displayed())
    press(Keys.ESCAPE)
    wait.until(lambda d: not dialog.is_displayed())
    assert project.catalog.query("SELECT COUNT(*) FROM reviews")[0][0] == 12
    shot = tmp_path / "review-actions.png"
    assert browser.save_screenshot(str(shot))


def test_a_thousand_image_project_opens_fast_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_review_scale import N_IMAGES, build_big_project

    root = tmp_path / "big"
    build_big_project(root)
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "-C", str(root), "review", "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        browser.get(url + "?verdict=&review=")
        WebDriverWait(browser, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        # The browser's own clock, from navigation start: the page is parsed and its script has run
        # (keys work) once DOMContentLoaded ends. Selenium's round trips are not the page's time.
        ready_ms = browser.execute_script(
            "return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == 120 and browser.find_element(By.CSS_SELECTOR, '[data-count="matching"]').text == str(N_IMAGES)
        assert 0 < ready_ms < 2000, ready_ms
        # More than two cards per row, and only thumbnails near the viewport are fetched (lazy loading).
        tops = [c.location["y"] for c in cards[:10]]
        assert tops.count(tops[0]) >= 3
        thumbs = browser.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.name.includes('/thumb')).length")
        assert 0 < thumbs < 2 * len(cards)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
