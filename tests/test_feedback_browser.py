"""The judging page in a real browser (headless Chromium via Selenium, on a real server bound to
127.0.0.1): keyboard and mouse verdicts, a written answer, undo, reload, and model output that
holds HTML and <script> shown as text without running.

Skipped, with the reason, where Chromium or its driver is not installed (``make test`` installs
them with apt when it runs as root)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tunesmith.feedback import listen
from tunesmith.feedback.prompts import Prompt
from tunesmith.feedback.server import create_app
from tunesmith.feedback.store import FeedbackStore, Item, item_id

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:
    SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and SELENIUM),
    reason="needs Chromium, chromedriver and selenium (apt-get install chromium chromium-driver; "
    "make test installs them when run as root)",
)

HOSTILE = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"><b>bold</b>'


def items() -> list[Item]:
    out = []
    responses = [(HOSTILE, "plain answer"), ("2", "3"), ("7", "8"), ("9", "10"), ("11", "12")]
    for i, pair in enumerate(responses):
        p = Prompt(
            [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": f"Question {i}: what is {i} plus 1? <i>not italic</i>"},
            ]
        )
        out.append(Item(item_id("pair", p, ["m1", "m2"]), p, list(pair), ["m1", "m2"]))
    return out


@pytest.fixture
def server(tmp_path):
    """A real server on a free 127.0.0.1 port, stopped at the end of the test."""
    import uvicorn

    store = FeedbackStore(tmp_path / "prefs.jsonl")
    its = items()
    store.plan([it.id for it in its])
    for it in its:
        store.add(it)
    sock = listen("127.0.0.1", 0)
    app = create_app(store, None, ["127.0.0.1", "localhost"])
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", store, its
    srv.should_exit = True
    thread.join(10)
    store.close()
    sock.close()


@pytest.fixture
def browser(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(15)
    yield driver
    driver.quit()


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_judging_in_a_browser(server, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, store, its = server
    wait = WebDriverWait(browser, 10)
    text_of = lambda css: browser.find_element(By.CSS_SELECTOR, css).text  # noqa: E731

    def shows(item: Item) -> None:
        wait.until(lambda d: text_of("#response-b .response-text") == item.responses[1])

    def progress(n: int) -> None:
        wait.until(lambda d: text_of("#progress").startswith(f"{n} of 5 judged"))

    def press(key: str) -> None:
        browser.find_element(By.TAG_NAME, "body").send_keys(key)

    browser.get(url)
    name = wait.until(lambda d: d.find_element(By.ID, "name"))
    name.send_keys("ana", Keys.ENTER)

    # Hostile model output is text: visible literally, nothing ran, no element was made.
    shows(its[0])
    assert not browser.find_element(By.ID, "name-form").is_displayed()
    assert browser.find_element(By.ID, "responses").is_displayed()
    assert text_of("#response-a .response-text") == HOSTILE
    assert "Question 0: what is 0 plus 1? <i>not italic</i>" in text_of("#conversation")
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#task script, #task img, #task b, #task i")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    browser.save_screenshot(str(tmp_path / "page.png"))

    press("1")  # A, by keyboard
    progress(1)
    shows(its[1])
    box = browser.find_element(By.ID, "better")
    box.send_keys("2 (two)")  # digits typed in the answer box are text, not verdicts
    assert box.get_attribute("value") == "2 (two)" and text_of("#progress").startswith("1 of 5")
    box.send_keys(Keys.ESCAPE)
    press("2")  # B, by keyboard, with the written answer
    progress(2)
    shows(its[2])
    press("3")  # tie, by keyboard
    progress(3)
    shows(its[3])
    browser.find_element(By.CSS_SELECTOR, 'button[data-verdict="both_bad"]').click()  # mouse
    progress(4)
    shows(its[4])
    press("u")  # undo the mouse verdict: that pair comes back
    progress(3)
    shows(its[3])
    wait.until(lambda d: "Undone" in text_of("#status"))

    browser.refresh()  # the name is remembered and the pair is still this judge's
    shows(its[3])
    progress(3)

    prefs = rows(tmp_path / "prefs.jsonl")
    assert [(r["chosen"], r["rejected"], r["verdict"], r["judge"]) for r in prefs] == [
        (HOSTILE, "plain answer", "a", "ana"),
        ("3", "2", "b", "ana"),
        ("2 (two)", "2", "b", "ana"),
        ("2 (two)", "3", "b", "ana"),
    ]
    assert all(r["prompt"] == its[0].prompt.value for r in prefs[:1])
    ties = rows(tmp_path / "prefs.ties.jsonl")
    assert [(r["reason"], r["response_a"], r["response_b"]) for r in ties] == [("tie", "7", "8")]
    assert store.progress("ana")["judged"] == 3
