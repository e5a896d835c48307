"""Run by the WebUI (A1111 `launch_utils.run_extension_installer`, Forge alike) before it loads extensions.

Delta Sampling needs only what every WebUI already has: torch, safetensors and numpy. This file
installs nothing (a pip run here could replace the WebUI's own torch build) and touches no
network; it only checks that those packages import and says clearly what to do if one does not.
A non-zero exit makes the WebUI show this message in its console, then start normally.
"""

from __future__ import annotations

import importlib.util
import sys

REQUIRED = ("torch", "safetensors", "numpy")
MIN_PYTHON = (3, 10)


def missing_packages(names: tuple[str, ...] | None = None) -> list[str]:
    """The names (default: REQUIRED) that cannot be imported here (checked without importing them)."""
    return [name for name in (REQUIRED if names is None else names) if importlib.util.find_spec(name) is None]


def problems() -> list[str]:
    out = []
    if sys.version_info < MIN_PYTHON:
        out.append(f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; this WebUI runs "
                   f"{sys.version.split()[0]}. Use the Python version your WebUI recommends.")
    missing = missing_packages()
    if missing:
        out.append(f"missing Python package(s): {', '.join(missing)}. They come with every Stable Diffusion "
                   f"WebUI; this Python ({sys.executable}) is not the WebUI's own environment, or that "
                   f"environment is broken. Start the WebUI with its launcher (webui.sh / webui-user.bat) "
                   f"or reinstall it.")
    return out


def main() -> int:
    found = problems()
    for problem in found:
        print(f"[Delta Sampling] {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
