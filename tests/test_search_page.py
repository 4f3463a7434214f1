"""The search page in headless Chromium, driven by Selenium: a query typed into the box and
submitted shows the same top-k images, keys and captions as the HTTP API returns."""
from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from test_retrieval_support import encoder, tiny_index
from vlp.retrieval.search import Searcher
from vlp.retrieval.service import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"),
    pytest.mark.skipif(not CHROMEDRIVER.is_file(),
                       reason=f"{CHROMEDRIVER} is absent (apt-get install -y chromium-driver)"),
]
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1000,700"]
WAIT_S = 30


@pytest.fixture(scope="module")
def server():
    """The app under uvicorn on a free 127.0.0.1 port, in a thread of this process."""
    searcher = Searcher(tiny_index(), encoder=encoder())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver (explicit paths: no driver download)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = Path(tempfile.mkdtemp(prefix="vlp-chromium-profile-"))
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def screenshot_on_failure(driver, path: Path):
    """On any failure keep what the browser showed, and name the file in the error."""
    try:
        yield
    except BaseException as err:
        driver.save_screenshot(str(path))
        raise AssertionError(f"{err} (screenshot: {path})") from err


def api_results(base: str, text: str, k: int) -> list[dict]:
    response = httpx.post(f"{base}/search", json={"text": text, "k": k}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def submitted(driver, text: str, k: int, submit) -> list[dict]:
    """Type `text`, pick k, submit with `submit`; wait for k loaded tiles and read them."""
    Select(driver.find_element(By.ID, "k")).select_by_visible_text(str(k))
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text)
    submit(box)
    status = f"{k} results for “{text}”"

    def done(d):
        tiles = d.find_elements(By.CSS_SELECTOR, "#results figure.hit")
        return (d.find_element(By.ID, "status").text == status and len(tiles) == k
                and all(t.get_attribute("data-loaded") == "1" for t in tiles))

    try:
        WebDriverWait(driver, WAIT_S).until(done)
    except TimeoutException:
        raise AssertionError(f"no {k} loaded result tiles after {WAIT_S}s; status line: "
                             f"{driver.find_element(By.ID, 'status').text!r}") from None
    return [{"id": int(t.get_attribute("data-id")), "key": t.get_attribute("data-key"),
             "caption": t.find_element(By.TAG_NAME, "figcaption").text}
            for t in driver.find_elements(By.CSS_SELECTOR, "#results figure.hit")]


def test_typed_query_shows_the_same_top_results_as_the_api(server, browser, tmp_path):
    browser.get(server + "/")
    with screenshot_on_failure(browser, tmp_path / "failure.png"):
        tiles = submitted(browser, "a yellow triangle", 16, lambda box: box.send_keys(Keys.ENTER))
        expected = api_results(server, "a yellow triangle", 16)
        assert tiles == [{"id": h["id"], "key": h["key"], "caption": h["caption"]} for h in expected]
        assert len({t["key"] for t in tiles}) == 16
        # Every tile shows a decoded image (naturalWidth > 0), not a broken-image icon.
        widths = browser.execute_script(
            "return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
        assert len(widths) == 16 and min(widths) > 0
        browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 5_000


def test_a_second_query_from_the_button_replaces_the_results(server, browser, tmp_path):
    browser.get(server + "/")
    with screenshot_on_failure(browser, tmp_path / "failure.png"):
        submitted(browser, "a red circle", 16, lambda box: box.send_keys(Keys.ENTER))
        button = browser.find_element(By.CSS_SELECTOR, "#form button[type=submit]")
        tiles = submitted(browser, "a blue square", 8, lambda box: button.click())
        expected = api_results(server, "a blue square", 8)
        assert [(t["key"], t["caption"]) for t in tiles] == [(h["key"], h["caption"]) for h in expected]


def test_an_empty_query_shows_a_message_and_no_tiles(server, browser, tmp_path):
    browser.get(server + "/")
    with screenshot_on_failure(browser, tmp_path / "failure.png"):
        box = browser.find_element(By.ID, "query")
        box.send_keys("   ", Keys.ENTER)
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").text == "type a query first"
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
        assert browser.find_elements(By.CSS_SELECTOR, "#results figure.hit") == []
