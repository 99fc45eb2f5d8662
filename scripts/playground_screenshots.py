"""Screenshots of the playground (``GET /``) with the embedded default model, as ``lowdiff serve`` serves it:
docs/playground-before.png (the page loaded) and docs/playground-after.png (8 sneakers generated).

    .venv/bin/python scripts/playground_screenshots.py [--out-dir docs]

Needs Debian's chromium and chromium-driver and the selenium package (dev extras); the same headless
setup as tests/service/test_playground.py.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings

ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=900,720",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--class-name", default="Sneaker")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings()), log_config=None, access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)

    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for arg in (*ARGS, f"--user-data-dir={profile}"):
            options.add_argument(arg)
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            wait = WebDriverWait(driver, 60, poll_frequency=0.1)
            driver.get(url + "/")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) > 0)
            select = Select(driver.find_element(By.ID, "class"))
            select.select_by_visible_text(next(o.text for o in select.options if o.text.endswith(args.class_name)))
            driver.find_element(By.ID, "seed").send_keys("0")
            driver.save_screenshot(str(args.out_dir / "playground-before.png"))
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: "compute" in d.find_element(By.ID, "timings").text)
            driver.save_screenshot(str(args.out_dir / "playground-after.png"))
        finally:
            driver.quit()
    server.should_exit = True
    print(f"wrote {args.out_dir / 'playground-before.png'} and {args.out_dir / 'playground-after.png'}")


if __name__ == "__main__":
    main()
