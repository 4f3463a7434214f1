"""The search page in headless Chromium: a query typed into the box shows top-k images."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import uvicorn

from test_retrieval_support import encoder, tiny_index
from vlp.retrieval.search import Searcher
from vlp.retrieval.service import create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000"]


class Hits(HTMLParser):
    """Collects the result cards (<figure class="hit" data-id data-loaded>) of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.status = ""
        self._in_status = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and attrs.get("class") == "hit":
            self.cards.append(attrs)
        self._in_status = attrs.get("id") == "status"

    def handle_data(self, data):
        if self._in_status:
            self.status += data


@pytest.fixture(scope="module")
def server():
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
    yield f"http://127.0.0.1:{port}", searcher
    srv.should_exit = True
    thread.join(10)


def chromium(args: list[str], profile: Path) -> str:
    result = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_typed_query_shows_top_k_images(server, tmp_path):
    base, searcher = server
    # ?q= fills the query box and submits the form: the same path as typing + Enter.
    dom = chromium(["--dump-dom", f"{base}/?q=a+yellow+triangle"], tmp_path / "profile")
    page = Hits()
    page.feed(dom)
    expected = [h.id for h in searcher.search_text("a yellow triangle", 16)]
    assert [int(c["data-id"]) for c in page.cards] == expected
    assert all(c.get("data-loaded") == "1" for c in page.cards), "some result images did not load"
    assert re.search(r"16 results for .a yellow triangle.", page.status)
    # A screenshot for humans (kept in the test's tmp dir).
    chromium([f"--screenshot={tmp_path / 'page.png'}", "--window-size=1000,700",
              f"{base}/?q=a+yellow+triangle"], tmp_path / "profile2")
    assert (tmp_path / "page.png").stat().st_size > 5_000


def test_empty_query_shows_a_message(server, tmp_path):
    base, _ = server
    dom = chromium(["--dump-dom", f"{base}/"], tmp_path / "profile")
    page = Hits()
    page.feed(dom)
    assert page.cards == [] and "<form" in dom
