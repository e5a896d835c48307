"""The extension in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) on a real
A1111 1.10.1 page, driven with Selenium. Screenshots go to tests/hosts/artifacts/.
"""

from __future__ import annotations

import time

import pytest

from browser import error_badges, open_page, start_chrome, wait_for

from models import LORA, SOURCE

ACCORDION = "script_txt2img_delta_sampling_enable"   # A1111 Script.elem_id("enable") on the txt2img tab


@pytest.fixture
def browser(real_a1111):
    driver = start_chrome()
    try:
        yield driver
    finally:
        driver.quit()


def test_page_loads_clean_and_the_settings_section_renders(browser, real_a1111, artifacts):
    console = open_page(browser, real_a1111)
    assert "Traceback" not in console and "TypeError" not in console, console
    assert error_badges(browser) == []
    # offline: gradio 3.41's page also asks a CDN for iframeResizer; only this host's own resources count
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
              and not (e["source"] == "network" and not e["message"].startswith(real_a1111.url))]
    assert severe == [], severe

    browser.find_element("css selector", "#tabs > .tab-nav button:nth-child(n)")  # the tab bar exists
    tab = next(b for b in browser.find_elements("css selector", "#tabs > .tab-nav button") if b.text.strip() == "Settings")
    tab.click()
    section = wait_for(lambda: next(e for e in browser.find_elements("css selector", "#settings .tab-nav button")
                                    if e.text.strip() == "Delta Sampling"), what="the Delta Sampling settings tab")
    section.click()
    device = wait_for(lambda: browser.find_element("css selector", "#setting_delta_sampling_device"),
                      what="the device setting")
    time.sleep(1)
    assert error_badges(browser) == []
    browser.find_element("css selector", "#settings").screenshot(str(artifacts / "a1111-settings.png"))
    assert device.is_displayed()


def test_accordion_paste_and_generate(browser, real_a1111, artifacts):
    # an infotext from the API with non-default Delta settings, pasted into the prompt box
    from test_a1111_api import ds
    made = real_a1111.txt2img(ds(scale=2.5, schedule="linear", end=0.75, guidance="cond", reuse=2,
                                 resolution="native"), prompt="a fox in the snow")
    infotext = made.infotexts[0]
    assert "Delta scale: 2.5" in infotext

    open_page(browser, real_a1111)
    accordion = browser.find_element("id", ACCORDION)
    assert "Delta Sampling" in accordion.text
    prompt = browser.find_element("css selector", "#txt2img_prompt textarea")
    browser.execute_script("arguments[0].value = arguments[1]; updateInput(arguments[0]);", prompt, infotext)
    browser.find_element("css selector", "#txt2img_tools #paste, #tab_txt2img #paste").click()

    checkbox = browser.find_element("id", ACCORDION + "-visible-checkbox")
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
    accordion.screenshot(str(artifacts / "a1111-accordion.png"))

    browser.find_element("id", "txt2img_generate").click()
    info = wait_for(lambda: (t := browser.find_element("id", "html_info_txt2img").text) and "Delta scale" in t and t,
                    timeout=600, what="a generated image with Delta keys")
    assert "Delta scale: 2.5" in info and "Delta schedule: linear" in info and f"Delta source: {SOURCE}" in info
