"""The extension in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) on a real
A1111 1.10.1 page, driven with Selenium. Screenshots go to tests/hosts/artifacts/.
"""

from __future__ import annotations

import time

import pytest

from browser import error_badges, open_page, paste_and_generate, start_chrome, wait_for


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
    paste_and_generate(browser, real_a1111, artifacts / "a1111-accordion.png")
