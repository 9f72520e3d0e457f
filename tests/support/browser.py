"""Debian's chromium, headless, through its own chromedriver (Selenium never downloads a driver): a driver, a
full-page screenshot, and the page's Content-Security-Policy violations."""

import base64
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"  # Debian's package chromium
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver: the same version, pinned by its Depends
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "var" / "test-artifacts"
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # chromium does not start as root without it
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",  # no calls home from a machine with no internet
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--window-size=1280,900",
)


def make_driver(profile_dir):
    """A headless Chromium with a fresh profile in `profile_dir`; fails loudly when Debian's packages are
    missing (make test installs them)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (make test does, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.pop("SE_CHROMEDRIVER", None)  # it would win over the path given below
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    return webdriver.Chrome(service=service, options=options)


def screenshot(driver, name):
    """The whole page (not only the window) as var/test-artifacts/console/NAME.png; its path."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path = ARTIFACTS / "console" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def csp_violations(driver):
    """What the browser refused under the page's Content-Security-Policy since the last call (an inline
    script or style would be): its console's messages that name the policy."""
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry.get("message", "")]
