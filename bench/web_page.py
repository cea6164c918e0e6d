"""The web page's end-to-end latency: a photo chosen in headless Chromium until both result panels are on screen.

Point it at a running `flowers serve` (any models):

    flowers serve --ensemble runs/l4/ensemble --student runs/l5/student --port 8000 &
    FLOWERS_DATA=/work/shared/flowers102 python bench/web_page.py --url http://127.0.0.1:8000 --n 30

Each photo is uploaded through the page's file input, as a person would; the page times itself
(performance.now() from the file chosen to the frame after both panels are drawn) and the bench
reads that figure. The first `--warmup` photos are left out. Grad-CAM (the page's button) is
timed separately on `--explain` of the photos. Prints the CPU (model and vector flags) and the
1-minute load average, since both decide the figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu_info() -> str:
    """`lscpu`'s model name and the vector flags that decide INT8/fp32 speed."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown CPU (no lscpu)"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return f"{info.get('Model name', 'unknown').strip()}; flags: {' '.join(f for f in FLAGS if f in flags) or 'none'}"


def photos(n: int) -> tuple[list[Path], str]:
    """Flowers-102 JPEGs from $FLOWERS_DATA, else synthetic JPEGs at 500x375."""
    root = os.environ.get("FLOWERS_DATA")
    if root and Path(root, "jpg").is_dir():
        files = sorted(Path(root, "jpg").glob("*.jpg"))[:n]
        return files, f"Flowers-102 JPEGs from {root}/jpg (the first {len(files)})"
    from PIL import Image

    from flowers.data import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="web-bench-"))
    write_synthetic(tmp / "s", num_classes=5, per_class=max(1, n // 5 + 1), size=96, seed=0)
    files = []
    for src in sorted((tmp / "s" / "jpg").glob("*.jpg"))[:n]:
        out = tmp / src.name
        Image.open(src).convert("RGB").resize((500, 375)).save(out, "JPEG", quality=90)
        files.append(out)
    return files, f"synthetic JPEGs, 500x375 ({len(files)})"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='web-bench-chromium-')}",
                 "--window-size=1280,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def wait(driver, script: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(script)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running app's base URL")
    p.add_argument("--n", type=int, default=30, help="photos to upload (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="first uploads left out (default 3)")
    p.add_argument("--explain", type=int, default=5, help="photos to time Grad-CAM on (default 5)")
    args = p.parse_args(argv)

    files, source = photos(args.n + args.warmup)
    driver = browser()
    try:
        driver.get(args.url.rstrip("/") + "/")
        wait(driver, "return document.querySelector('#limits').textContent.includes('up to')")
        models = driver.execute_script("return fetch('v1/models').then(r => r.json())")["models"]
        page, cams, api = [], [], []
        with httpx.Client(base_url=args.url, timeout=120) as client:
            for i, f in enumerate(files):
                driver.find_element("id", "file").send_keys(str(f))
                ms = float(wait(driver, "return document.body.dataset.roundTripMs"))
                # the same request without the browser: what the page adds on top of the API
                t0 = time.perf_counter()
                r = client.post("/v1/compare?top_k=5", files={"file": (f.name, f.read_bytes(), "image/jpeg")})
                r.raise_for_status()
                if i >= args.warmup:
                    page.append(ms)
                    api.append((time.perf_counter() - t0) * 1e3)
                if args.warmup <= i < args.warmup + args.explain:
                    t0 = time.perf_counter()
                    driver.find_element("id", "explain").click()
                    wait(driver, "return ['ensemble', 'student'].every(r => "
                                 "document.getElementById('panel-' + r).dataset.cam === '1')")
                    cams.append((time.perf_counter() - t0) * 1e3)
    finally:
        driver.quit()

    print(f"CPU: {cpu_info()}; {os.cpu_count()} CPUs; 1-min load average at the end {os.getloadavg()[0]:.2f}")
    print(f"app: {args.url}; photos: {source}")
    for m in models:
        print(f"  {m['route']}: {m['name']} v{m['version']} ({m['kind']}, {m['image_size']} px, {m['uri']})")
    print(f"\npage, photo chosen -> both panels shown (n={len(page)}): p50 {statistics.median(page):.1f} ms, "
          f"p90 {pct(page, 0.9):.1f} ms, mean {statistics.fmean(page):.1f} ms, min {min(page):.1f} ms")
    print(f"the same POST /v1/compare from Python (httpx, multipart), after each page upload: "
          f"p50 {statistics.median(api):.1f} ms, p90 {pct(api, 0.9):.1f} ms")
    if cams:
        print(f"Grad-CAM button -> both heat maps shown (n={len(cams)}): p50 {statistics.median(cams):.1f} ms, "
              f"max {max(cams):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
