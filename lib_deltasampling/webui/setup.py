"""Process-wide registrations, done once when the WebUI loads the script.

Settings page, X/Y/Z axes (after every script is loaded, so A1111's xyz_grid is there), the API
route, and the clean-up when the WebUI reloads scripts.
"""

from __future__ import annotations


def register_callbacks(script_callbacks) -> None:
    from . import api, convert, options, paste, xyz
    from .script import remove_leftovers
    from .state import CACHE, HOST_APP

    options.apply_log_level()  # INFO by default, printed even when the host set up no logging
    script_callbacks.on_ui_settings(options.register_options)
    script_callbacks.on_infotext_pasted(paste.on_infotext_pasted)
    # X/Y/Z: now if its script is loaded already, and before the UI (with --nowebui the API builds
    # script UIs before `before_ui` runs); registering is idempotent.
    xyz.register_axes()
    script_callbacks.on_before_ui(xyz.register_axes)
    script_callbacks.on_app_started(lambda _demo, app: api.register_routes(app))
    script_callbacks.on_app_started(lambda _demo, app: HOST_APP.update(app=app))
    script_callbacks.on_app_started(lambda _demo, app: convert.register_routes(app))

    def unloaded() -> None:
        remove_leftovers()
        CACHE.release_all()
        HOST_APP.clear()

    script_callbacks.on_script_unloaded(unloaded)
