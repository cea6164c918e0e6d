"""The web page and the self-documenting API, in a real browser (headless Debian Chromium + selenium).

One Serve app on loopback for the module (the shared `ray_session`, the smoke checkpoint behind both
routes, as in test_serve.py). The browser opens `/`, uploads a real JPEG, waits for both result
panels and the Grad-CAM images, and checks what a person sees; then files the API refuses (SVG, HTML,
20 MB), each shown as the API's own message while the page keeps working. Screenshots go to the
test's tmp folder, or to $FLOWERS_SCREENSHOTS (docs/img/ holds the current ones).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

APP = "flowers-web-test"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OPTS = {"num_replicas": 1, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5}}
BODY_LIMIT = 6_000_000


@pytest.fixture(scope="module")
def web(ray_session, trained_checkpoint):
    from ray import serve

    from serve.app import make_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"ensemble_uri": str(trained_checkpoint), "student_uri": str(trained_checkpoint),
            "max_body_bytes": BODY_LIMIT}
    try:  # a failed start must not leave this Serve instance behind for the next module's
        serve.run(make_app(args, {"Ensemble": OPTS, "Student": OPTS}), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            yield base, client
    finally:
        serve.shutdown()  # Serve's controller, proxy and the app; the session's Ray stays up


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()):
        pytest.fail("Chromium and chromedriver are needed (Debian: apt install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # network events, for the docs test
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo(synth_root, tmp_path_factory) -> Path:
    """A real JPEG (a synthetic flower image, enlarged to photo-like 480x360)."""
    from PIL import Image

    src = sorted((synth_root / "jpg").glob("*.jpg"))[0]
    path = tmp_path_factory.mktemp("upload") / "my <img src=x onerror=alert(1)> flower.jpg"  # markup stays text
    Image.open(src).convert("RGB").resize((480, 360)).save(path, "JPEG", quality=90)
    return path


def _shots() -> Path | None:
    d = os.environ.get("FLOWERS_SCREENSHOTS")
    return Path(d) if d else None


def _screenshot(driver, path: Path) -> None:
    """Whole page (beyond the viewport), as a person would scroll through it."""
    import base64

    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def _wait(driver, predicate, timeout: float = 60.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), message=what)


def _visible_text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))


def _panel(driver, route: str) -> dict:
    """What a person reads in one result panel."""
    return driver.execute_script("""
        const p = document.getElementById('panel-' + arguments[0]);
        const q = (s) => { const e = p.querySelector(s); return e ? e.textContent : null; };
        return {ready: p.dataset.ready === '1', name: q('.m-name'), version: q('.m-version'), alias: q('.m-alias'),
                latency: q('.m-latency'), entropy: q('.entropy'), flag: q('.flag') ,
                classes: [...p.querySelectorAll('.topk li')].map(li => ({
                    name: li.querySelector('.cls').textContent, pct: li.querySelector('.pct').textContent,
                    p: parseFloat(li.dataset.probability),
                    bar: li.querySelector('.fill').getBoundingClientRect().width
                         / li.querySelector('.bar').getBoundingClientRect().width})),
                cam: p.dataset.cam === '1',
                camLoaded: p.querySelector('.cam img').complete && p.querySelector('.cam img').naturalWidth > 0};
    """, route)


def test_page_compares_explains_and_shows_errors(web, browser, photo, trained_checkpoint, tmp_path):
    import torch

    base, client = web
    names = list(torch.load(trained_checkpoint, map_location="cpu", weights_only=False)["class_names"])
    served = {m["route"]: m for m in client.get("/v1/models").json()["models"]}
    browser.set_window_size(1280, 900)
    browser.get(base + "/")
    assert browser.title == "flowers: try the models"
    _wait(browser, lambda d: "up to" in _visible_text(d, "#limits"), 30, "the page read GET /v1/models")

    t0 = time.perf_counter()
    _upload(browser, photo)
    page_ms = float(_wait(browser, lambda d: d.execute_script("return document.body.dataset.roundTripMs"), 60,
                          "both panels shown"))
    wall_ms = (time.perf_counter() - t0) * 1e3
    print(f"page end-to-end (file chosen -> both panels shown): {page_ms:.1f} ms in the page, "
          f"{wall_ms:.1f} ms seen by the test")

    # the same photo through the API: what the page shows must be what the API says
    api = client.post("/v1/compare?top_k=5", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
    for route in ("ensemble", "student"):
        p = _panel(browser, route)
        assert len(p["classes"]) == min(5, len(names))
        assert [c["name"] for c in p["classes"]] == [t["name"] for t in api[route]["top_k"]]
        assert all(c["name"] in names for c in p["classes"])
        probs = [c["p"] for c in p["classes"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        for c in p["classes"]:  # the bar's length is the probability; the text says it too
            assert abs(c["bar"] - c["p"]) < 0.02 and c["pct"] == f"{100 * c['p']:.1f} %", c
        m = served[route]
        assert p["name"].startswith(m["name"])
        assert p["version"] == (str(m["version"]) if m["version"] is not None else "unregistered (served from a file)")
        assert p["alias"] == (m["alias"] or "none")
        assert p["flag"] == ("uncertain" if api[route]["uncertain"] else "confident")
        assert f"threshold {m['uncertainty_threshold']:.2f}" in p["entropy"]
        assert "ms in the server" in p["latency"]
    agreement = _visible_text(browser, "#agreement")
    assert agreement == f"Both models say: {api['ensemble']['name']}"  # same checkpoint behind both
    assert _visible_text(browser, "#filename").startswith(photo.name)  # shown as text, not markup
    assert not browser.find_elements("css selector", "#filename img")

    browser.find_element("id", "explain").click()
    _wait(browser, lambda d: all(_panel(d, r)["cam"] and _panel(d, r)["camLoaded"] for r in ("ensemble", "student")),
          120, "both Grad-CAM images")
    caption = _visible_text(browser, "#panel-ensemble .cam figcaption")
    assert caption.startswith(f"Grad-CAM of {api['ensemble']['name']}")

    shots = _shots() or tmp_path
    _screenshot(browser, shots / "web.png")
    browser.set_window_size(390, 844)  # a phone: one column, nothing wider than the screen
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    _screenshot(browser, shots / "web-phone.png")
    browser.set_window_size(1280, 900)

    # files the API refuses: its own message in the page, no model call, nothing rendered from them
    svg = tmp_path / "evil.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>document.title="pwned"</script></svg>')
    html = tmp_path / "page.html"
    html.write_text("<html><body><script>document.title='pwned'</script><h1>hi</h1></body></html>")
    big = tmp_path / "huge.jpg"
    big.write_bytes(photo.read_bytes() + b"\0" * (20 * 1024 * 1024))
    text = tmp_path / "notes.jpg"  # named like a photo, is not one: the decoder refuses it
    text.write_text("hello, this is not a flower\n" * 20)
    before = client.get("/v1/models").json()["models"]
    for path, needle in ((svg, "415: unsupported file type 'image/svg+xml'"),
                         (html, "415: unsupported file type 'text/html'"),
                         (big, "413: body of"), (text, "400: not a recognised image")):
        _upload(browser, path)
        _wait(browser, lambda d: _visible_text(d, "#error") != "", 60, f"error for {path.name}")
        shown = _visible_text(browser, "#error")
        assert shown.startswith(needle), shown
        assert browser.title == "flowers: try the models"
        assert not any(_panel(browser, r)["ready"] for r in ("ensemble", "student"))
        if path is svg:
            _screenshot(browser, shots / "web-error.png")
    after = client.get("/v1/models").json()["models"]
    # none of the refused uploads reached a model's batch (the decode error of 'notes.jpg' did, as a 400 item)
    for b, a in zip(before, after):
        assert sum(a["batch_sizes_seen"].values()) - sum(b["batch_sizes_seen"].values()) <= 1

    _upload(browser, photo)  # the page keeps working
    _wait(browser, lambda d: all(_panel(d, r)["ready"] for r in ("ensemble", "student")), 60, "panels again")
    assert not browser.find_element("id", "error").is_displayed()


def test_page_works_from_the_keyboard(web, browser, photo):
    """Tab reaches the photo chooser and, after a photo, the Grad-CAM button; Enter presses it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    base, _ = web
    browser.get(base + "/")
    _upload(browser, photo)
    _wait(browser, lambda d: all(_panel(d, r)["ready"] for r in ("ensemble", "student")), 60, "both panels")
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    seen = []
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(browser.execute_script("const a = document.activeElement; return a.id || a.textContent.trim()"))
        if seen[-1] == "explain":
            break
    assert "file" in seen and seen[-1] == "explain", seen  # links, then the photo chooser, then the button
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    _wait(browser, lambda d: all(_panel(d, r)["cam"] for r in ("ensemble", "student")), 120, "Grad-CAM by keyboard")


def _network(driver) -> dict[str, dict]:
    """Requests since the last call, from Chromium's network events: id → {url, response, blocked}."""
    reqs: dict[str, dict] = {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        p = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            reqs.setdefault(p["requestId"], {"url": p["request"]["url"], "response": False, "blocked": None})
        elif msg["method"] == "Network.responseReceived" and p["requestId"] in reqs:
            reqs[p["requestId"]]["response"] = True
        elif msg["method"] == "Network.loadingFailed" and p["requestId"] in reqs:
            reqs[p["requestId"]]["blocked"] = p.get("blockedReason")
    return reqs


def test_docs_and_redoc_load_nothing_from_another_host(web, browser, photo, tmp_path):
    """/docs and /redoc render from the app's own assets; nothing reaches another host (ReDoc's
    sidebar logo points at its CDN: the page's CSP blocks it before a request leaves)."""
    base, client = web
    for path, ready in (("/docs", ".opblock"), ("/redoc", "[data-section-id]")):
        html = client.get(path).text
        assert "cdn." not in html and "googleapis" not in html and "fastapi.tiangolo.com" not in html
        _network(browser)
        browser.get(base + path)
        _wait(browser, lambda d: d.find_elements("css selector", ready), 60, f"{path} rendered")
        time.sleep(0.5)
        reqs = _network(browser).values()
        own = [r for r in reqs if r["url"].startswith(base + "/")]
        other = [r for r in reqs if r["url"].startswith("http") and not r["url"].startswith(base + "/")]
        assert any(r["url"].endswith(".js") and r["response"] for r in own), reqs
        assert all(r["blocked"] == "csp" and not r["response"] for r in other), other
        print(path, "own:", len(own), "other (blocked):", [r["url"] for r in other])
    # Swagger UI lists every route, with the photo upload as the request body
    browser.get(base + "/docs")
    _wait(browser, lambda d: len(d.find_elements("css selector", ".opblock")) >= 5, 60, "operations")
    text = browser.find_element("css selector", ".swagger-ui").text
    for route in ("/v1/predict/{model}", "/v1/compare", "/v1/explain/{model}", "/v1/models", "/healthz"):
        assert route in text
    # "Try it out" sends a photo: the declared body gives a file chooser, the optional query fields stay empty
    browser.find_elements("css selector", ".opblock-summary")[0].click()  # POST /v1/predict/{model}
    chooser = _wait(browser, lambda d: d.find_elements("css selector", ".opblock.is-open input[type=file]"), 30,
                    "the request body's file chooser")[0]
    fields = browser.find_elements("css selector", ".opblock.is-open .parameters input:not([type=file])")
    assert [f.get_attribute("value") for f in fields] == [""], [f.get_attribute("outerHTML") for f in fields]
    chooser.send_keys(str(photo))
    browser.find_element("css selector", ".opblock.is-open .execute").click()
    status = ".opblock.is-open .live-responses-table .response-col_status:not(.col_header)"
    codes = f"return [...document.querySelectorAll('{status}')].map(e => e.textContent.trim())"
    _wait(browser, lambda d: d.execute_script(codes) == ["200"], 60, "Execute")
    answer = browser.execute_script("return document.querySelector("
                                    "'.opblock.is-open .live-responses-table pre.microlight').textContent")
    assert json.loads(answer)["route"] == "ensemble" and len(json.loads(answer)["top_k"]) == 5
    _screenshot(browser, tmp_path / "docs.png")


def test_openapi_served_is_valid_and_answers_match_it(web, photo):
    from openapi_spec_validator import validate

    from serve import schemas

    _, client = web
    spec = client.get("/openapi.json").json()
    validate(spec)
    assert "requestBody" in spec["paths"]["/v1/explain/{model}"]["post"]
    jpeg = photo.read_bytes()
    raw = client.post("/v1/predict/student?top_k=3", content=jpeg, headers={"content-type": "image/jpeg"})
    schemas.Prediction.model_validate(raw.json())
    both = client.post("/v1/compare", files={"file": ("f.jpg", jpeg, "image/jpeg")})
    schemas.Comparison.model_validate(both.json())
    schemas.Models.model_validate(client.get("/v1/models").json())
    schemas.Health.model_validate(client.get("/healthz").json())
    cam = client.post("/v1/explain/ensemble", content=jpeg, headers={"content-type": "image/jpeg"})
    assert cam.status_code == 200, cam.text
    schemas.Explanation.model_validate(cam.json())
    bad = client.post("/v1/predict/student?top_k=0", content=jpeg, headers={"content-type": "image/jpeg"})
    assert bad.status_code == 400
    schemas.ErrorBody.model_validate(bad.json())
    assert client.post("/v1/predict/student?top_k=102", content=jpeg,
                       headers={"content-type": "image/jpeg"}).status_code == 200  # the declared maximum


def test_explain_route_checks_input_like_predict(web, photo):
    import base64

    from PIL import Image

    _, client = web
    jpeg = photo.read_bytes()
    r = client.post("/v1/explain/student?label=1", files={"file": ("f.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == 1 and body["route"] == "student" and body["maps"] == 1
    png = Image.open(io.BytesIO(base64.b64decode(body["png_base64"])))
    assert png.format == "PNG" and png.width >= 256
    cases = [
        (client.post("/v1/explain/student", content=b"", headers={"content-type": "image/jpeg"}), 400, "empty body"),
        (client.post("/v1/explain/student", content=b"junk" * 50, headers={"content-type": "image/jpeg"}), 400,
         "not a recognised image"),
        (client.post("/v1/explain/student", content=b"\xff" * (BODY_LIMIT + 1),
                     headers={"content-type": "image/jpeg"}), 413, "byte limit"),
        (client.post("/v1/explain/student", content=jpeg, headers={"content-type": "text/html"}), 415,
         "unsupported content type"),
        (client.post("/v1/explain/student", files={"file": ("x.svg", b"<svg/>", "image/svg+xml")}), 415,
         "unsupported file type"),
        (client.post("/v1/explain/resnet", content=jpeg, headers={"content-type": "image/jpeg"}), 404,
         "unknown model"),
        (client.post("/v1/explain/student?label=101", content=jpeg, headers={"content-type": "image/jpeg"}), 400,
         "label"),
        (client.post("/v1/explain/student?label=-1", content=jpeg, headers={"content-type": "image/jpeg"}), 400,
         "label"),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status and needle in resp.json()["error"], (status, resp.text)
    print(json.dumps({k: v for k, v in body.items() if k != "png_base64"}))


def test_explain_is_bounded_and_prediction_keeps_answering(web, photo):
    """16 explain requests at once: at most 4 wait per ingress replica, the rest get 503 at once with
    the JSON error; predictions sent meanwhile are all answered (Grad-CAM runs in its own deployment)."""
    import concurrent.futures as cf
    import threading

    _, client = web
    jpeg = photo.read_bytes()
    start = threading.Barrier(20)

    def explain(_):
        start.wait()
        return client.post("/v1/explain/ensemble", content=jpeg, headers={"content-type": "image/jpeg"})

    def predict(_):
        start.wait()
        return client.post("/v1/predict/student", content=jpeg, headers={"content-type": "image/jpeg"})

    with cf.ThreadPoolExecutor(20) as pool:
        cams = [pool.submit(explain, i) for i in range(16)]
        preds = [pool.submit(predict, i) for i in range(4)]
        cams, preds = [f.result() for f in cams], [f.result() for f in preds]
    codes = sorted(r.status_code for r in cams)
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    busy = next(r.json() for r in cams if r.status_code == 503)
    assert busy["status"] == 503 and "explanations already waiting" in busy["error"]
    assert [r.status_code for r in preds] == [200] * 4
