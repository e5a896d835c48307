"""Host adapters: the only package that imports gradio or the WebUI's `modules`.

Everything here is generated from, or checked against, the one settings definition
(`engine/settings.py` FIELDS): UI controls, infotext paste, script arguments, X/Y/Z axes,
the HTTP route and the settings page. Host modules are imported inside functions, so importing
this package costs nothing and works without a WebUI (the tests use a stand-in, tests/a1111).
"""
