"""The app in a real headless browser (Debian's chromium driven by Playwright): use cases 1-3
clicked through the page, a screenshot of each; fails when the gallery stays empty.

Screenshots go to pytest's tmp dir, or to $SAEFE_SCREENSHOTS when set. To refresh the committed
docs/screenshots from the full demo index::

    SAEFE_APP_INDEX=index/demo SAEFE_SCREENSHOTS=docs/screenshots \
        python -m pytest tests/test_app_browser.py -s
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fixtures.app import launch_app, small_demo

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1400, "height": 1000}
T = 30_000  # ms, per wait


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        print(f"SKIP: {CHROMIUM} is absent; install it with `apt-get install -y chromium chromium-driver`")
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright python package is missing (pip install playwright; never `playwright install`)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, saefe_home):
    if os.environ.get("SAEFE_APP_INDEX"):
        index, weights = Path(os.environ["SAEFE_APP_INDEX"]), None
    else:
        index, weights = small_demo(tmp_path_factory)
    demo, _, url = launch_app(index, weights)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SAEFE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def status_has(page, text: str) -> None:
    page.wait_for_function(
        "(t) => (document.querySelector('#saefe-status')?.innerText || '').includes(t)", arg=text, timeout=T)


def choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(option)
    page.locator(f'li[data-testid="dropdown-option"][aria-label="{option}"]').first.click()


def set_slider(page, elem_id: str, value: float) -> None:
    num = page.locator(f"#{elem_id} input[type=number]").first
    num.fill(str(value))
    num.press("Enter")
    num.blur()


def open_group(page, elem_id: str) -> None:
    page.locator(f"#{elem_id} > button").first.click()
    page.wait_for_timeout(200)


def search(page, mode: str) -> int:
    page.locator("#mode label", has_text=mode).first.click()
    page.click("#run-btn")
    status_has(page, f"({mode} mode)")
    page.wait_for_selector("#gallery img", timeout=T)
    n = page.locator("#gallery img").count()
    assert n > 0, "the results gallery stayed empty"
    return n


def test_use_cases_1_to_3_in_a_browser(browser, app_url, shots):
    t0 = time.time()
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url, wait_until="load", timeout=T)
    page.wait_for_selector("#apply-btn", timeout=T)
    mark = lambda what: print(f"  {time.time() - t0:5.1f}s {what}")  # noqa: E731
    mark("page loaded")

    # 1: set an emotion on all sliders, search
    choose(page, "label-dd", "Happiness")
    page.click("#apply-btn")
    status_has(page, "Happiness's mean activations applied")
    assert search(page, "direction") > 0
    page.screenshot(path=str(shots / "use_case_1_emotion.png"))
    mark("use case 1")

    # 2: adjust sliders by hand, one of them negative, exact feature-space search
    open_group(page, "group-0")  # Shared
    set_slider(page, "s-0", -0.8)
    set_slider(page, "s-1", 0.9)
    page.wait_for_timeout(300)
    assert search(page, "features") > 0
    assert "-0.800" in page.inner_text("#saefe-status") or "+0.900" in page.inner_text("#saefe-status")
    page.locator("#group-0").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "use_case_2_sliders.png"), full_page=True)
    mark("use case 2")

    # a bad expression shows a readable line, and the page keeps working
    page.fill("#expr-box textarea", "Esteem + Nobody")
    page.click("#expr-btn")
    status_has(page, "Error: unknown label 'Nobody'")

    # 3: label arithmetic: Esteem - Male + Adult, with the bias panel
    page.fill("#expr-box textarea", "Esteem - Male + Adult")
    page.click("#expr-btn")
    status_has(page, "expression 'Esteem - Male + Adult' applied")
    assert search(page, "direction") > 0
    page.wait_for_function("() => (document.querySelector('#bias')?.innerText || '').includes('MaxSkew')", timeout=T)
    bias = page.inner_text("#bias")
    assert "gender" in bias and "age" in bias
    mark("use case 3")

    # 5 + 6: click a result: its heat map and top features; click a feature: the inspector
    page.locator("#gallery .thumbnail-item").first.click()
    page.wait_for_selector('#img-feats [data-testid="cell-0-0"]', timeout=T)
    page.wait_for_selector("#saliency img", timeout=T)
    mark("selected result + heat map")
    page.locator('#img-feats [data-testid="cell-0-0"]').first.click()
    page.wait_for_function("() => (document.querySelector('#insp-md')?.innerText || '').includes('activation frequency')",
                           timeout=T)
    page.locator("[data-testid='toast-body']").first.wait_for(state="detached", timeout=T)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shots / "use_case_3_expression_bias.png"), full_page=True)
    assert not errors, errors
    for name in ("use_case_1_emotion.png", "use_case_2_sliders.png", "use_case_3_expression_bias.png"):
        assert (shots / name).stat().st_size > 10_000
    print(f"browser use cases done in {time.time() - t0:.1f}s; screenshots in {shots}")
    page.close()
