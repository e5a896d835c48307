"""HTTP route `GET /delta-sampling/v1/models`: usable source checkpoints and adapters, with families.

Registered from `script_callbacks.on_app_started(lambda demo, app: register_routes(app))`.
As A1111's own routes (`modules/api/api.py`): `--api-auth` applies HTTP basic auth to the route
(`Api.add_api_route` adds `Depends(Api.auth)`; that object is not reachable from an extension, so
the same check is rebuilt from `shared.cmd_opts.api_auth`); listing does not take the queue lock
(as `/sdapi/v1/sd-models` and `/sdapi/v1/loras`), re-scanning the folders (`?refresh=true`) does
(as `/sdapi/v1/refresh-checkpoints`).

Families come from the files' headers only (safetensors JSON header: key names and shapes; no
tensor is read and no model is loaded), through `runtime.detect.detect_family` for checkpoints and
`runtime.adapters.apply.guess_family` for adapters, memoised per (path, mtime, size). Pickle files
(.ckpt/.pt) are not opened here: reading one means loading it whole; their family is null.

    {"checkpoints": [{"title": "sd15.safetensors [abcdef0123]", "name": "sd15.safetensors", "family": "SD1.x"}],
     "adapters": [{"name": "moxin", "alias": "moxin", "family": "SD1.x", "tag": "<lora:moxin:1>"}],
     "unusable": [{"kind": "checkpoint", "name": "refiner.safetensors", "problem": "this is an SDXL refiner, ..."}]}
"""

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("delta-sampling")

ROUTE = "/delta-sampling/v1/models"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# ---------------------------------------------------------------- families from file headers

def _file_key(path: Path) -> Optional[tuple]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4096)
def _checkpoint_family(path: str, mtime_ns: int, size: int) -> tuple[Optional[str], Optional[str]]:
    from ..errors import ModelFileError
    from ..runtime.checkpoint import open_safetensors_header
    from ..runtime.detect import detect_family

    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None, None
    try:
        return detect_family(open_safetensors_header(Path(path))).label, None
    except ModelFileError as exc:
        return None, exc.problem


@functools.lru_cache(maxsize=4096)
def _adapter_family(path: str, mtime_ns: int, size: int) -> tuple[Optional[str], Optional[str]]:
    from ..errors import ModelFileError
    from ..runtime.adapters.apply import guess_family
    from ..runtime.adapters.keys import group_layers
    from ..runtime.checkpoint import open_safetensors_header

    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None, None
    try:
        store = open_safetensors_header(Path(path))
    except ModelFileError as exc:
        return None, exc.problem
    groups, _ = group_layers(store.keys())
    if not groups:
        return None, "holds no adapter layers this runtime knows"
    family = guess_family(store, groups)
    if family is None:  # A1111's own guess (Lora network.NetworkOnDisk.detect_version): kohya metadata
        if str(store.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            family = "SDXL"
        elif str(store.metadata.get("ss_v2", "")) == "True":
            family = "SD2.x"
    return family, None


def checkpoint_family(path: "str | Path") -> tuple[Optional[str], Optional[str]]:
    """(family label, None) for a usable source checkpoint, (None, problem) for an unusable one,
    (None, None) when unknown (a pickle file, or the file is gone)."""
    key = _file_key(Path(path))
    return _checkpoint_family(*key) if key else (None, None)


def adapter_family(path: "str | Path") -> tuple[Optional[str], Optional[str]]:
    """(family label or None, problem or None) of a LoRA/LyCORIS file."""
    key = _file_key(Path(path))
    return _adapter_family(*key) if key else (None, None)


# ---------------------------------------------------------------- the host's lists

def host_checkpoints() -> list[tuple[str, str, Path]]:
    """(title, name, file) of every checkpoint in the WebUI's list."""
    from modules import sd_models

    return [(title, getattr(info, "name", title), Path(info.filename))
            for title, info in list(sd_models.checkpoints_list.items())]


def host_adapters() -> list[tuple[str, str, Path]]:
    """(name, alias, file) of every LoRA the WebUI lists (the Lora extension, else the LoRA folders)."""
    networks = sys.modules.get("networks")
    available = getattr(networks, "available_networks", None) if networks else None
    if available is not None:
        return [(name, getattr(entry, "alias", name) or name, Path(entry.filename))
                for name, entry in list(available.items())]
    from ..errors import UserError
    from . import files

    out = []
    for name in files.folder_loras():
        try:
            out.append((name, name, files.adapter_file(name)))
        except UserError:
            continue
    return out


def adapter_choices() -> list[tuple[str, str]]:
    """(name, label) for the UI's LoRA picker; the label shows the family when it is known."""
    out = []
    for name, _, path in host_adapters():
        family, _ = adapter_family(path)
        out.append((name, f"{name} ({family})" if family else name))
    return sorted(out, key=lambda item: item[0].lower())


def list_models(checkpoints: list[tuple[str, str, Path]], adapters: list[tuple[str, str, Path]]) -> dict[str, Any]:
    """The route's answer for these (title, name, file) checkpoints and (name, alias, file) adapters."""
    out: dict[str, list] = {"checkpoints": [], "adapters": [], "unusable": []}
    for title, name, path in checkpoints:
        family, problem = checkpoint_family(path)
        if problem:
            out["unusable"].append({"kind": "checkpoint", "name": title, "problem": problem})
        else:
            out["checkpoints"].append({"title": title, "name": name, "family": family})
    for name, alias, path in adapters:
        family, problem = adapter_family(path)
        if problem:
            out["unusable"].append({"kind": "adapter", "name": name, "problem": problem})
        else:
            out["adapters"].append({"name": name, "alias": alias, "family": family, "tag": f"<lora:{alias}:1>"})
    return out


def refresh_host_lists() -> None:
    """Re-scan the model folders, under the queue lock as `/sdapi/v1/refresh-checkpoints` does."""
    from modules import call_queue, shared

    with call_queue.queue_lock:
        shared.refresh_checkpoints()
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()


# ---------------------------------------------------------------- the route

def credentials_match(table: dict[str, str], username: str, password: str) -> bool:
    from secrets import compare_digest

    return username in table and compare_digest(password, table[username])


def auth_dependencies() -> list:
    """`[Depends(check)]` when the WebUI runs with --api-auth (user:password,user2:password2), else []."""
    from modules import shared

    api_auth = getattr(shared.cmd_opts, "api_auth", None)
    if not api_auth:
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    table = dict(entry.split(":", 1) for entry in api_auth.split(","))

    def check(credentials=Depends(HTTPBasic())) -> bool:
        if credentials_match(table, credentials.username, credentials.password):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def models_endpoint(refresh: bool = False) -> dict:
    """GET /delta-sampling/v1/models[?refresh=true]"""
    if refresh:
        refresh_host_lists()
    return list_models(host_checkpoints(), host_adapters())


def register_routes(app: Any) -> None:
    """`on_app_started` callback body: add the route to the WebUI's FastAPI app."""
    app.add_api_route(ROUTE, models_endpoint, methods=["GET"], dependencies=auth_dependencies())
    install_request_check(app)


# ------------------------------------------------------------------ HTTP errors for bad Delta Sampling arguments
# A1111 runs script hooks inside try/except, so nothing raised while a generation runs becomes an HTTP
# error. The request is therefore checked before A1111 sees it: an ASGI middleware reads the body of
# /sdapi/v1/txt2img and /img2img, validates alwayson_scripts["Delta Sampling"], answers 422 with the
# message when it is wrong, and otherwise hands the same body on untouched.

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def request_error(body: bytes) -> str | None:
    """The problem with a generation request's Delta Sampling arguments, or None (also when absent)."""
    import json

    from ..errors import UserError
    from ..runtime.adapters.tags import adapter_requests
    from . import files
    from .args import settings_from_script_args
    from .preprocessors import preprocessor_problem

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None  # not ours to judge: A1111 answers malformed JSON itself
    scripts = data.get("alwayson_scripts") if isinstance(data, dict) else None
    entry = next((v for k, v in (scripts or {}).items() if isinstance(k, str) and k.lower() == "delta sampling"), None)
    if not isinstance(entry, dict) or "args" not in entry:
        return None
    args = entry["args"]
    if not isinstance(args, list):
        return ('alwayson_scripts["Delta Sampling"]["args"] must be a list: the positional values, '
                'or one dict of named settings such as [{"scale": 1.5}]')
    try:
        settings = settings_from_script_args(args, source="API")
        if settings.enabled:
            if not settings.source_checkpoint:
                return 'Delta Sampling "source_checkpoint": no source checkpoint given. Name the base model your LoRA was made for'
            files.checkpoint_file(settings.source_checkpoint, 'Delta Sampling "source_checkpoint"')
            if settings.adapted_checkpoint:
                files.checkpoint_file(settings.adapted_checkpoint, 'Delta Sampling "adapted_checkpoint"')
            for request in adapter_requests(settings.adapters)[1]:
                files.adapter_file(request.name)
            if (problem := settings.control_problem()) is not None:
                return str(problem)
            for kind, name in (("controlnet", settings.control_model), ("ipadapter", settings.ip_adapter),
                               ("clipvision", settings.ip_encoder if settings.ip_adapter else "")):
                if name:
                    files.model_file(kind, name)
            if settings.control_model and (problem := preprocessor_problem(settings.control_preprocessor)):
                return problem
    except UserError as exc:
        return str(exc)
    return None


class RequestCheck:
    """ASGI middleware: 422 with a clear message for bad Delta Sampling API arguments."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message.get("type") == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        error = request_error(body)
        if error is not None:
            import json
            payload = json.dumps({"error": "Delta Sampling", "detail": error}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install_request_check(app: Any) -> bool:
    """Add `RequestCheck` to the running app the way A1111 adds its own middleware at startup
    (reset the stack, add, rebuild). Idempotent; False (with a warning) where the app refuses."""
    if any(getattr(m, "cls", None) is RequestCheck for m in getattr(app, "user_middleware", [])):
        return True
    try:
        app.middleware_stack = None
        app.add_middleware(RequestCheck)
        app.middleware_stack = app.build_middleware_stack()
        return True
    except Exception as exc:  # noqa: BLE001 - the generation itself still refuses bad arguments
        log.warning("Delta Sampling could not add its API argument check (%s); bad API arguments will "
                    "stop the generation instead of returning HTTP 422", exc)
        return False
