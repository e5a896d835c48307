"""The extension in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) on a real
A1111 1.10.1 page, driven with Selenium. Screenshots go to tests/hosts/artifacts/.
"""

from __future__ import annotations

from browser import check_page_and_settings, paste_and_generate


def test_page_loads_clean_and_the_settings_section_renders(chrome, real_a1111, artifacts):
    check_page_and_settings(chrome, real_a1111, artifacts / "a1111-settings.png")


def test_accordion_paste_and_generate(chrome, real_a1111, artifacts):
    paste_and_generate(chrome, real_a1111, artifacts / "a1111-accordion.png")
