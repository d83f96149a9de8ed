"""Retake docs/serve.png: the web page of a real `pictor serve` with the shipped default model, in Debian's
chromium driven by Playwright, after generating from a few benchmark-style prompts.

    python docs/screenshot.py [--out docs/serve.png]

The pictures are whatever the model draws for these prompts and seeds (nothing is picked by hand); the
README says how well the model does on the benchmark. Needs /usr/bin/chromium (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ("a photo of a blue star", "a red circle and a green square", "three yellow triangles")


def start_server(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, "-m", "pictor.cli", "serve", "--model", "default", "--device", "cpu"]
    command += ["--port", "0", "--data-dir", str(data_dir), "--log-level", "warning"]
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads a pipe while the page runs
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pictor serve exited with {proc.returncode}:\n{log.read_text()}")
        m = re.search(r"listening on (http://\S+?)/? ", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"pictor serve printed no address within 120 s:\n{log.read_text()}")


def shoot(url: str, out: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 1010})
        page.goto(url + "/")
        expect(page.locator("#model-info")).not_to_contain_text("loading", timeout=120_000)
        expect(page.locator("#model-info")).to_contain_text("Model default, default 64x64")
        page.get_by_text("Settings", exact=True).click()
        page.get_by_label("Seed", exact=True).fill("42")
        page.get_by_label("Images", exact=True).fill("4")
        for prompt in PROMPTS:
            page.get_by_label("Prompt", exact=True).fill(prompt)
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_role("img", name=f"{prompt} (seed 45)")).to_be_visible(timeout=120_000)
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        png = page.screenshot()
        browser.close()
    with Image.open(io.BytesIO(png)) as im:  # 3/4 size and 96 colours: a small file in the repository
        small = im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(colors=96).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve.png"))
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "data", Path(tmp) / "server.log")
        try:
            shoot(url, args.out)
        finally:
            proc.terminate()
            proc.wait(30)
    print(args.out)


if __name__ == "__main__":
    main()
