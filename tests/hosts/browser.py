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


TXT2IMG_ACCORDION = "script_txt2img_delta_sampling_enable"   # Script.elem_id("enable") on the txt2img tab


def paste_and_generate(browser, host, screenshot) -> None:
    """An infotext from the API with non-default Delta settings, pasted into the prompt box: every Delta
    control restored; then Generate in the page gives an image whose info carries them."""
    from generations import ds
    from models import LORA, SOURCE

    made = host.txt2img(ds(scale=2.5, schedule="linear", end=0.75, guidance="cond", reuse=2,
                                 resolution="native"), prompt="a fox in the snow")
    infotext = made.infotexts[0]
    assert "Delta scale: 2.5" in infotext

    open_page(browser, host)
    accordion = browser.find_element("id", TXT2IMG_ACCORDION)
    assert "Delta Sampling" in accordion.text
    prompt = browser.find_element("css selector", "#txt2img_prompt textarea")
    browser.execute_script("arguments[0].value = arguments[1]; updateInput(arguments[0]);", prompt, infotext)
    browser.find_element("css selector", "#txt2img_tools #paste, #tab_txt2img #paste").click()

    checkbox = browser.find_element("id", TXT2IMG_ACCORDION + "-visible-checkbox")
    wait_for(lambda: checkbox.is_selected(), timeout=30, what="the accordion enabled by the paste")

    def value(name: str) -> str:
        el = browser.find_element("id", f"script_txt2img_delta_sampling_{name}")
        inputs = el.find_elements("css selector", "input[type=number], textarea, input[type=text], "
                                                   "input:not([type]), input:checked")  # a dropdown's input has no type
        return inputs[0].get_attribute("value") if inputs else ""

    wait_for(lambda: value("scale") == "2.5", timeout=30, what="Delta scale 2.5 restored")
    assert value("end") == "0.75"
    assert value("schedule") == "linear" and value("guidance") == "cond" and value("resolution") == "native"
    assert value("reuse") == "2"
    assert SOURCE in value("source_checkpoint")
    assert f"<lora:{LORA}:1>" in value("adapters")
    accordion.screenshot(str(screenshot))

    browser.find_element("id", "txt2img_generate").click()
    info = wait_for(lambda: (t := browser.find_element("id", "html_info_txt2img").text) and "Delta scale" in t and t,
                    timeout=600, what="a generated image with Delta keys")
    assert "Delta scale: 2.5" in info and "Delta schedule: linear" in info and f"Delta source: {SOURCE}" in info


def check_page_and_settings(driver, host, screenshot) -> None:
    """The page loads with no server traceback, no error badge, no failed resource of the host's own,
    shows the accordion, and the Settings page's Delta Sampling section renders."""
    console = open_page(driver, host)
    assert "Traceback" not in console and "TypeError" not in console, console
    assert error_badges(driver) == []
    # offline: gradio 3.41's page also asks a CDN for iframeResizer; only this host's own resources count
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and not (e["source"] == "network" and not e["message"].startswith(host.url))]
    assert severe == [], severe
    accordion = wait_for(lambda: driver.find_element("id", TXT2IMG_ACCORDION), what="the Delta Sampling accordion")
    assert "Delta Sampling" in accordion.text

    tab = next(b for b in driver.find_elements("css selector", "#tabs > .tab-nav button") if b.text.strip() == "Settings")
    tab.click()
    section = wait_for(lambda: next(e for e in driver.find_elements("css selector", "#settings .tab-nav button")
                                    if e.text.strip() == "Delta Sampling"), what="the Delta Sampling settings tab")
    section.click()
    device = wait_for(lambda: driver.find_element("css selector", "#setting_delta_sampling_device"),
                      what="the device setting")
    time.sleep(1)
    assert device.is_displayed() and error_badges(driver) == []
    driver.find_element("css selector", "#settings").screenshot(str(screenshot))
    assert "Error loading script: delta_sampling.py" not in host.console_text()   # the host's own message
