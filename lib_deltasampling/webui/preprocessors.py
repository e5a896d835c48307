"""The host ControlNet's preprocessors, through each one's public interface (runtime/preprocess.py
`HostPreprocessors`). None of their code is copied; nothing is imported from them at start-up.

- Forge, Forge Neo, reForge: the built-in ControlNet registers every preprocessor in
  `modules_forge.shared.supported_preprocessors` (name -> Preprocessor), the place Forge's
  forge_legacy_preprocessors tells other code to use them from. One is called as that ControlNet
  calls it (`scripts/controlnet.py` process_unit_after_click_generate): an [H, W, 3] uint8 RGB image,
  `resolution`, `slider_1`, `slider_2`, under no_grad. -1 takes the slider's own default
  (`slider_N.gradio_update_kwargs["value"]`), as sd-webui-controlnet's API does.
- A1111 with sd-webui-controlnet: the list is its `external_code.get_modules()`, the sliders'
  labels `get_modules_detail()`; a preprocessor runs through its HTTP endpoint `POST
  /controlnet/detect`, whose function is called in-process on the WebUI's FastAPI app with the
  API's own arguments (base64 image in, base64 image out; -1 for a default).

Preprocessors that make no control image are not listed: IP-Adapter, InstantID, reference,
revision and inpaint ones (they return embeddings or act while sampling); a host's output that is
still no image is refused by name (runtime/preprocess.py hint_pixels).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import sys
from typing import Any

from ..runtime.preprocess import DEFAULT, available

NOT_MAPS = ("ip-adapter", "instant-id", "instant_id", "reference", "revision", "inpaint", "clip_vision",
            "clip-vit", "insightface", "insight_face", "ip-adapter-auto", "t2ia_style")
DETECT_ROUTE = "/controlnet/detect"
Labels = tuple[str | None, str | None, str | None]   # resolution, threshold A, threshold B (None: unused)
BUILT_IN_LABELS: dict[str, Labels] = {"canny": (None, "Canny low threshold", "Canny high threshold")}


def _makes_a_map(name: str, tags: list[str]) -> bool:
    words = [name.lower(), *(str(t).lower() for t in tags)]
    return not any(w.startswith(prefix) or prefix in w for w in words for prefix in NOT_MAPS)


class ForgePreprocessors:
    """Forge's built-in ControlNet registry (Forge, Forge Neo, reForge)."""

    source = "Forge's ControlNet"

    def __init__(self, registry: dict) -> None:
        self.registry = registry

    def names(self) -> list[str]:
        # the ControlNet's own order: higher sorting_priority first, then by name
        ordered = sorted(self.registry.items(), key=lambda kv: (-getattr(kv[1], "sorting_priority", 0), kv[0]))
        return [name for name, p in ordered if _makes_a_map(name, list(getattr(p, "tags", []) or []))]

    @staticmethod
    def _slider(p: Any, attr: str) -> dict:
        return dict(getattr(getattr(p, attr, None), "gradio_update_kwargs", None) or {})

    def labels(self, name: str) -> Labels:
        p = self.registry[name]
        out = [self._slider(p, a) for a in ("slider_resolution", "slider_1", "slider_2")]
        return tuple(s.get("label") if s.get("visible") else None for s in out)   # type: ignore[return-value]

    def run(self, pixels: Any, name: str, resolution: int, threshold_a: float, threshold_b: float) -> Any:
        import torch

        p = self.registry[name]
        values = []
        for attr, value in (("slider_resolution", resolution), ("slider_1", threshold_a), ("slider_2", threshold_b)):
            values.append(self._slider(p, attr).get("value") if value == DEFAULT else value)
        with torch.no_grad():
            return p(input_image=pixels, resolution=int(values[0] or 512), slider_1=values[1], slider_2=values[2])


class ControlNetExtensionPreprocessors:
    """sd-webui-controlnet (A1111): listed by `external_code`, run by its `/controlnet/detect` route."""

    source = "sd-webui-controlnet"

    def __init__(self, external_code: Any) -> None:
        self.external_code = external_code

    def names(self) -> list[str]:
        return [n for n in self.external_code.get_modules() if _makes_a_map(n, [])]

    def labels(self, name: str) -> Labels:
        sliders = [s.get("name") for s in self.external_code.get_modules_detail().get(name, {}).get("sliders", [])]
        resolution = sliders.pop(0) if sliders and "resolution" in str(sliders[0]).lower() else None
        return resolution, (sliders + [None, None])[0], (sliders + [None, None])[1]

    def run(self, pixels: Any, name: str, resolution: int, threshold_a: float, threshold_b: float) -> Any:
        from PIL import Image

        from ..runtime.images import decode_base64
        from .state import HOST_APP

        app = HOST_APP.get("app")
        route = next((r for r in getattr(getattr(app, "router", None), "routes", [])
                      if getattr(r, "path", None) == DETECT_ROUTE and "POST" in getattr(r, "methods", ())), None)
        if route is None:
            raise RuntimeError(f"its {DETECT_ROUTE} route is not on the WebUI's app (is the extension up to date?)")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        call = route.endpoint(controlnet_module=name, controlnet_input_images=[base64.b64encode(buffer.getvalue()).decode()],
                              controlnet_processor_res=int(resolution), controlnet_threshold_a=float(threshold_a),
                              controlnet_threshold_b=float(threshold_b), controlnet_masks=[], low_vram=False)
        answer = _run_coroutine(call)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not images:
            return answer.get("tensor", answer) if isinstance(answer, dict) else answer   # refused as no image
        image = images[0]   # bytes in-process (A1111's encode_pil_to_base64); FastAPI would send text
        text = image.decode("ascii") if isinstance(image, bytes) else image
        return decode_base64(text, f'sd-webui-controlnet\'s preprocessor "{name}" output')


def _run_coroutine(call: Any) -> Any:
    """The route function's result, from the generation's thread (which runs no event loop; if one
    runs here, on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, call).result()


def host_preprocessors(modules: dict | None = None) -> ForgePreprocessors | ControlNetExtensionPreprocessors | None:
    """The running host's preprocessors, from what it has imported; None: the built-in set only."""
    loaded = sys.modules if modules is None else modules
    registry = getattr(loaded.get("modules_forge.shared"), "supported_preprocessors", None)
    if isinstance(registry, dict) and registry:
        return ForgePreprocessors(registry)
    for name in ("internal_controlnet.external_code", "scripts.external_code"):
        external_code = loaded.get(name)
        if hasattr(external_code, "get_modules") and hasattr(external_code, "get_modules_detail"):
            return ControlNetExtensionPreprocessors(external_code)
    return None


def preprocessor_choices() -> list[str]:
    """The accordion's and the X/Y/Z axis' list: none, the host's, the built-in ones it lacks."""
    return available(host_preprocessors())


def preprocessor_labels(name: str) -> Labels:
    """The labels of the resolution and the two thresholds for `name`; None for one it does not use."""
    host = host_preprocessors()
    if host is not None and name in host.names():
        try:
            return host.labels(name)
        except Exception:       # labels are a nicety: show all three rather than fail the UI
            return ("Preprocessor resolution", "Preprocessor threshold A", "Preprocessor threshold B")
    return BUILT_IN_LABELS.get(name, (None, None, None))


def preprocessor_problem(name: str) -> str | None:
    """Why `name` cannot run here (for the API's 422), None when it can."""
    names = preprocessor_choices()
    if name in names:
        return None
    shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
    return (f'Delta Sampling "control_preprocessor": {name!r} is not a preprocessor of this WebUI. '
            f"Use one of: {shown}")
