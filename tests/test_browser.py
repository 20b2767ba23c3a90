"""The generated HTML opened in a real, headless Chromium (selenium + Debian's chromium/chromium-driver).

Each test loads a file:// page, waits for plotly to render, and asserts: the flow graph shows the expected number
of nodes (plotly's ``gd._fullData`` and the SVG points in the DOM), no JavaScript error was logged, and no network
request was made (Chrome DevTools performance log: no http(s)/ws(s)/ftp request; the file:// page itself is fine).
A screenshot of each page is saved under test-artifacts/ (git-ignored).

Skipped with a reason when chromium, chromedriver or selenium is missing; scripts/test.sh installs them in CI and sets
TLR_REQUIRE_BROWSER=1 there, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import HAS_HOOKED, TOKENS, make_bridge, make_hooked, run_cache
from tl_residual import visualize as V

CHROMIUM = os.environ.get("TLR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TLR_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium chromium-driver)"
    if not (os.path.exists(CHROMEDRIVER) or shutil.which("chromedriver")):
        return f"chromedriver not found at {CHROMEDRIVER} (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Any:
    reason = _missing()
    if reason and os.environ.get("TLR_REQUIRE_BROWSER") == "1":  # set by scripts/test.sh in CI
        pytest.fail(f"TLR_REQUIRE_BROWSER=1 but {reason}")
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tlr-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1600,1200",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver: Any, path: Path, n_plots: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser"), driver.get_log("performance")  # drop what an earlier page left
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "const p = document.querySelectorAll('.js-plotly-plot');"
            "return p.length === arguments[0] && Array.from(p).every(g => g._fullLayout && g.querySelector('svg'));",
            n_plots,
        )
    )


def _rendered_nodes(driver: Any, div: str) -> tuple[int, int, int]:
    """(points in plotly's full data, SVG points in the DOM, node labels in the DOM) of the node traces; the labels
    are annotations named ``label`` (drawn on a white background over the edges)."""
    return tuple(
        driver.execute_script(
            "const gd = arguments[0] ? document.getElementById(arguments[0])"
            " : document.querySelector('.js-plotly-plot');"
            "const idx = gd._fullData.map((t, i) => t.meta === 'node' ? i : -1).filter(i => i >= 0);"
            "const layers = gd.querySelectorAll('.scatterlayer .trace');"
            "const labels = gd._fullLayout.annotations.map((a, i) => a.name === 'label' ? i : -1).filter(i => i >= 0);"
            "return [idx.reduce((a, i) => a + gd._fullData[i]._length, 0),"
            "        idx.reduce((a, i) => a + layers[i].querySelectorAll('path.point').length, 0),"
            "        labels.filter(i => gd.querySelector(`.annotation[data-index='${i}']`)).length];",
            div,
        )
    )


def _hover(driver: Any, meta: str, point: int) -> str:
    """Hover point ``point`` of the first trace whose ``meta`` is ``meta``; the hover label's text."""
    driver.execute_script(
        "const gd = document.querySelector('.js-plotly-plot');"
        "Plotly.Fx.hover(gd, [{curveNumber: gd._fullData.findIndex(t => t.meta === arguments[0]),"
        "                      pointNumber: arguments[1]}]);",
        meta,
        point,
    )
    time.sleep(0.4)  # plotly throttles hover events
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.hoverlayer .hovertext')).map(e => e.textContent).join('|');"
    )


def _problems(driver: Any, page: Path) -> tuple[list[str], list[str]]:
    """(JavaScript errors from the console, URLs of every request that would leave the machine).

    file:// (the page), data:, blob: and the browser's own chrome:// resources are not network requests.
    """
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = msg["params"].get("request", {}).get("url") or msg["params"].get("url", "")
            if url.split(":", 1)[0].lower() in NETWORK_SCHEMES:
                requests.append(url)
    return errors, requests


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    w = driver.execute_script("return Math.max(document.body.scrollWidth, 800)")
    h = driver.execute_script("return Math.max(document.body.scrollHeight, 600)")
    driver.set_window_size(min(w + 40, 8000), min(h + 40, 12000))
    out = ARTIFACTS / name
    driver.save_screenshot(str(out))
    driver.set_window_size(1600, 1200)
    return out


def test_the_checks_see_errors_and_requests(browser, tmp_path):
    """The two detectors work: a page that throws and loads a remote image is caught by both."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<html><body><img src='http://127.0.0.1:9/x.png'><script>notDefined();</script>"
        "<div class='js-plotly-plot'></div></body></html>",
        encoding="utf-8",
    )
    browser.get_log("browser"), browser.get_log("performance")
    browser.get(page.resolve().as_uri())
    errors, requests = _problems(browser, page)
    assert any("notDefined" in e for e in errors)
    assert requests == ["http://127.0.0.1:9/x.png"]


def test_random_model_flow_graph_renders_offline(browser, tmp_path):
    model = make_hooked("llama", n_kv_heads=2) if HAS_HOOKED else make_bridge("llama", n_kv_heads=2)
    _, cache = run_cache(model)
    graph = V.flow_graph(model, cache, tokens=TOKENS, n_memory=2, n_attn_neurons=2, n_neurons=3)
    page = tmp_path / "flow_graph.html"
    graph.to_html(str(page))
    _open(browser, page, 1)
    data_points, svg_points, labels = _rendered_nodes(browser, "")
    assert data_points == svg_points == labels == len(graph.nodes)
    # hovering a node shows its name, the target's probability/rank and its log-prob increase; an edge its value
    nodes = graph.nodes[graph.nodes["kind"] != "query"].reset_index(drop=True)
    k = int(nodes.index[nodes["kind"] == "memory_value"][0])
    text = _hover(browser, "node", k)
    assert nodes.loc[k, "id"] in text and "target 't" in text and "log-prob increase" in text
    assert "→" in _hover(browser, "edge-hover", 0)
    errors, requests = _problems(browser, page)
    assert errors == [] and requests == []
    assert _screenshot(browser, "browser-random-flow-graph.png").stat().st_size > 10_000


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_report_renders_offline(browser, smollm2, tmp_path):
    """The CLI's report for "The capital of France is": the default graph shows the top-scoring layers (23 and 24,
    with L23.H4.p4), every figure fits a 1600 px window without horizontal scrolling (colour bar included), the
    graph is complete, and there is no JavaScript error or network request."""
    from typer.testing import CliRunner

    from tl_residual.cli import app

    page = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["explain", "--prompt", "The capital of France is", "--top-k", "10", "--html", str(page)]
    )
    assert result.exit_code == 0, result.output
    _open(browser, page, 6)
    ids = browser.execute_script("return Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => g.id)")
    assert ids == [
        "flow-graph-L23",
        "flow-graph-L24",
        "layer-contributions",
        "bs-trajectories",
        "bs-minus",
        "parts-table",
    ]
    assert browser.execute_script(
        "return document.getElementById('flow-graph-L23')._fullData.filter(t => t.meta === 'node')"
        ".some(t => Array.from(t.customdata).includes('L23.H4.p4'));"
    )
    n_nodes = browser.execute_script("return document.querySelectorAll('#nodes-table tbody tr').length")
    counts = [_rendered_nodes(browser, f"flow-graph-L{l}") for l in (23, 24)]
    assert all(d == s == lab for d, s, lab in counts) and sum(c[0] for c in counts) == n_nodes > 40
    # no horizontal scrolling at 1600 px; every figure and its colour bar lie inside the window
    width = browser.execute_script("return window.innerWidth")
    assert width == 1600
    assert browser.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    rights = browser.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot, .colorbar'))"
        ".map(e => e.getBoundingClientRect().right)"
    )
    assert rights and max(rights) <= width
    # the final residual of layer 24 is drawn, memory values show their source token, no replacement character
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('#flow-graph-L23 .annotation-text')).map(e => e.textContent)"
    )
    assert any(t.startswith("France ▸") for t in labels) and not any("\ufffd" in t for t in labels)
    nodes_text = browser.execute_script("return document.getElementById('nodes-table').textContent")
    assert "nan" not in nodes_text.lower() and "0.0000\n" not in nodes_text
    assert browser.execute_script(
        "return document.getElementById('layer-contributions')._fullData.map(t => t._length);"
    ) == [30, 30]
    errors, requests = _problems(browser, page)
    assert errors == [] and requests == []
    assert _screenshot(browser, "browser-smollm2-report.png").stat().st_size > 50_000
    graph = browser.find_element("id", "flow-graph-L23")
    browser.execute_script("arguments[0].scrollIntoView()", graph)
    ARTIFACTS.mkdir(exist_ok=True)
    graph.screenshot(str(ARTIFACTS / "flow_graph_paris_L23.png"))  # docs/img/flow_graph_paris_L23.png comes from here
