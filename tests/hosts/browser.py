"""Headless Chromium (Debian's `chromium` + `chromium-driver`) on a real WebUI page, driven with Selenium:
what the browser tests of every host share."""

from __future__ import annotations

import shutil
import time

import pytest

def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: "
                    "apt-get install -y chromium chromium-driver (.ci/run installs them)")
    return browser, driver


def start_chrome():
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager look for a driver online
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(120)
    return driver


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the page is still building
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(driver, host) -> str:
    """Load the page and wait for the UI and its settings load; returns the server console added meanwhile."""
    before = len(host.console_text())
    driver.get(host.url)
    wait_for(lambda: driver.find_element("css selector", "#txt2img_prompt textarea"), what="the txt2img prompt")
    # the checkpoint picker at the top: A1111's quicksettings, Forge's own (main_entry.py)
    wait_for(lambda: driver.execute_script(
        "return document.querySelector('#setting_sd_model_checkpoint input, #forge_refresh_checkpoint') !== null"),
        what="the checkpoint picker")
    time.sleep(3)  # demo.load fills every setting right after the page appears
    return host.console_text()[before:]


def error_badges(driver) -> list[str]:
    """Gradio's red status badges ('Error') on components."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.error')].filter(e => e.offsetParent !== null)"
        ".map(e => (e.closest('[id]') || e).id + ': ' + e.textContent.trim()).filter(t => /error/i.test(t));")
