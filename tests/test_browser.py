"""The web page in a real browser: headless Chromium, driven by Selenium, against `bytelm serve` on a tiny model.

It types a prompt, presses Generate and waits for the streamed text, checks the coloured glyphs (one per UTF-8
character) and the hover tooltip, stops a long generation, shows an API error, runs Analyze on pasted text
with entropy patches, and saves screenshots. Needs Debian's `chromium` and `chromium-driver` (the system
chromedriver, /usr/bin/chromedriver: nothing is downloaded) and the `selenium` package. Without them the test
is skipped, except under CI=true, where a missing browser is a failure (.ci/run installs it).

    BYTELM_UPDATE_SCREENSHOT=1 pytest tests/test_browser.py     # also writes docs/img/serve*.png
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bytelm.checkpoint import save_checkpoint
from bytelm.config import MODEL_PRESETS, ModelConfig
from bytelm.model import ByteLM

from conftest import TINY_DOCS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
REBOUND = "rebound.test"


def _browser_or_skip():
    """selenium's webdriver module, or skip (fail under CI=true) saying what is missing."""
    missing = []
    try:
        from selenium import webdriver
    except ImportError:
        webdriver, missing = None, ["the selenium package (pip install selenium)"]
    if CHROMIUM is None:
        missing.append("chromium (apt-get install chromium)")
    if not os.path.exists(CHROMEDRIVER):
        missing.append(f"{CHROMEDRIVER} (apt-get install chromium-driver)")
    if missing:
        reason = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: .ci/run installs them)")
        pytest.skip(reason)
    return webdriver


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """The tiny model after 80 steps on three repeated sentences (a few seconds): it has learnt them, so the
    page shows mostly expected bytes with some surprises, as a trained model does."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(**MODEL_PRESETS["tiny"]))
    data = torch.tensor(list(b"\0".join(TINY_DOCS.values())), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small run far slower on two threads of a busy machine
    try:
        for _ in range(80):
            starts = torch.randint(0, len(data) - 65, (16,), generator=g)
            window = torch.stack([data[s:s + 65] for s in starts])  # (16, 65)
            _, loss = model(window[:, :-1], targets=window[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("browser") / "tiny-trained.pt"
    save_checkpoint(path, model, model.config)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """The server's output, with uvicorn's access log: one line per request with its status."""
    return tmp_path_factory.mktemp("browser-log") / "serve.log"


@pytest.fixture(scope="module")
def server_port(trained_checkpoint, server_log):
    port = free_port()
    with open(server_log, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "serve", str(trained_checkpoint), "--port",
                                 str(port), "--access-log"], cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "bytelm serve exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "bytelm serve did not start in 60 s"
        time.sleep(0.2)
    yield port
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    webdriver = _browser_or_skip()
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900", "--force-device-scale-factor=1",
                # a name an attacker has rebound to 127.0.0.1 (DNS rebinding), without touching DNS
                f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def set_field(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Into tmp_path always; into docs/img as well with BYTELM_UPDATE_SCREENSHOT=1 (docs/serving.md shows it)."""
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("BYTELM_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / name)
    return shot


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_page_generates_colours_bytes_stops_and_analyzes(browser, server_port, name, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    server_url = f"http://{name}:{server_port}"
    d = browser
    find = d.find_element
    d.get(server_url + "/")
    wait_for(d, lambda d: "parameters" in find(By.ID, "model").text)

    # Generate: streamed, coloured, one glyph per character
    set_field(d, "prompt", "The quick brown")
    set_field(d, "max_tokens", "160")
    set_field(d, "seed", "1")
    set_field(d, "temperature", "1")
    find(By.ID, "generate").click()
    wait_for(d, lambda d: "bytes/s (server)" in find(By.ID, "status").text)
    glyphs = d.find_elements(By.CSS_SELECTOR, "#output .g")
    assert len(glyphs) >= 20
    classes = [g.get_attribute("class").split() for g in glyphs]
    assert all(len({"r1", "r2", "r3", "r4"} & set(c)) == 1 for c in classes)
    assert sum("r1" in c for c in classes) > len(classes) / 2  # the trained model expects most bytes
    assert find(By.ID, "error").get_attribute("hidden") is not None
    ActionChains(d).move_to_element(glyphs[8]).perform()
    wait_for(d, lambda d: find(By.ID, "tooltip").is_displayed())
    tip = find(By.ID, "tooltip").text
    assert "rank" in tip and "%" in tip and "bits" in tip
    assert len(find(By.ID, "tooltip").find_elements(By.TAG_NAME, "tr")) >= 5  # the top alternatives
    save_screenshot(d, tmp_path, "serve.png")

    # Stop: a long generation ends at once, and the server frees its slot
    ActionChains(d).move_to_element(find(By.ID, "prompt")).perform()
    set_field(d, "max_tokens", "4000")
    set_field(d, "seed", "")
    find(By.ID, "generate").click()
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#output .g")) > 5)
    find(By.ID, "stop").click()
    wait_for(d, lambda d: "(stopped)" in find(By.ID, "status").text)
    assert find(By.ID, "generate").is_enabled()
    import httpx
    deadline = time.monotonic() + 5
    while httpx.get(server_url + "/health").json()["active"]:
        assert time.monotonic() < deadline, "the stopped generation still holds its slot"
        time.sleep(0.05)

    # An API error is shown as a readable line
    set_field(d, "max_tokens", "999999")
    find(By.ID, "generate").click()
    wait_for(d, lambda d: find(By.ID, "error").is_displayed())
    assert "max_tokens is 999,999; the limit is 4,096" in find(By.ID, "error").text

    # Analyze: pasted text coloured glyph by glyph (multi-byte characters whole), bits per byte, patches
    find(By.ID, "tab-analyze").click()
    text = "The quick brown fox jumps over the lazy dog. Caf\u00e9 \u00fcber na\u00efve \u2192 bytes."
    set_field(d, "analyze-text", text)
    find(By.ID, "show-patches").click()
    find(By.ID, "analyze").click()
    wait_for(d, lambda d: "bits per byte" in find(By.ID, "analyze-status").text)
    assert find(By.ID, "error").get_attribute("hidden") is not None
    status = find(By.ID, "analyze-status").text
    assert f"{len(text.encode()):,} bytes" in status and "patches" in status
    glyphs = d.find_elements(By.CSS_SELECTOR, "#analysis .g")
    assert len(glyphs) == len(text)  # one glyph per character, however many bytes it has
    accented = glyphs[text.index("\u00e9")]
    assert accented.text == "\u00e9"
    assert len(d.find_elements(By.CSS_SELECTOR, "#analysis .g.patch")) >= 1
    ActionChains(d).move_to_element(accented).perform()
    wait_for(d, lambda d: "byte 0xc3" in find(By.ID, "tooltip").text)
    assert "byte 0xa9" in find(By.ID, "tooltip").text  # both bytes of the one glyph, each with its scores
    save_screenshot(d, tmp_path, "serve-analyze.png")


ATTACK_PAGE = """<!doctype html><title>waiting</title><script>
const api = "http://127.0.0.1:%d/v1/completions";
const body = JSON.stringify({prompt: "from another site", max_tokens: 4});
async function attack() {
  // no-cors: the browser sends it without asking the server first (text/plain body), and hides the answer
  await fetch(api, {method: "POST", mode: "no-cors", body: body});
  try {  // a JSON body needs the server's CORS consent first
    const r = await fetch(api, {method: "POST", headers: {"Content-Type": "application/json"}, body: body});
    document.title = "read " + r.status;
  } catch (e) {
    document.title = "blocked";
  }
}
attack().catch(e => { document.title = "error " + e; });
</script>"""


@pytest.fixture()
def attack_url(server_port):
    """A page on another origin (a second loopback port) that tries to use the server."""
    import http.server
    import threading
    page = (ATTACK_PAGE % server_port).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join(5)


def test_pages_of_other_sites_cannot_use_the_server(browser, server_port, server_log, attack_url):
    d = browser
    seen = server_log.stat().st_size
    d.get(attack_url)
    wait_for(d, lambda d: d.title != "waiting")
    assert d.title == "blocked"  # the preflight was refused, so the page never reads an answer
    deadline = time.monotonic() + 5  # the server refused the no-cors POST as well: it generated nothing
    while True:
        log = server_log.read_bytes()[seen:].decode()
        if '"POST /v1/completions HTTP/1.1" 403' in log and '"OPTIONS /v1/completions HTTP/1.1" 403' in log:
            break
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    assert '"POST /v1/completions HTTP/1.1" 200' not in log

    # DNS rebinding: a name the attacker points at 127.0.0.1 gets no page and no API
    d.get(f"http://{REBOUND}:{server_port}/")
    assert "is not a name of this server" in d.find_element("tag name", "body").text
    assert "bytelm" not in d.title
