"""Convert a LoRA for the WebUI's current checkpoint from inside the WebUI (bake/convert.py): a
background job, so generation goes on meanwhile; progress, cancel, the result written into the
host's LoRA folder and its list refreshed.

    POST /delta-sampling/v1/convert          {"lora": "style", "source_checkpoint": "sdxl_base.safetensors",
                                              "target_checkpoint": "" (the current one), "name": "", "threshold": 0.8,
                                              "rank": 0 (the LoRA's own), "overwrite": false}   -> 202 / 409 / 422
    GET  /delta-sampling/v1/convert          {"state": "running", "done": 12, "total": 176, "message": "...", "file": ...}
    POST /delta-sampling/v1/convert/cancel

One job at a time (the host's memory is for generation); its state lives in `state.CONVERT_JOB`.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingError, UserError

log = logging.getLogger("delta-sampling")
ROUTE = "/delta-sampling/v1/convert"


@dataclass
class ConvertJob:
    state: str = "idle"                  # idle, running, done, failed, cancelled
    done: int = 0
    total: int = 0
    message: str = "No conversion has run yet."
    file: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "message": self.message,
                "file": self.file}


@dataclass(frozen=True)
class ConvertRequest:
    lora: str
    source_checkpoint: str
    target_checkpoint: str = ""          # "": the WebUI's current checkpoint
    name: str = ""                       # "": <lora>-for-<target>
    threshold: float = 0.8
    rank: int = 0                        # 0: each layer's own rank
    overwrite: bool = False


def output_name(lora: str, target: Path, name: str) -> str:
    """The converted file's name in the LoRA folder: `name`, or <lora>-for-<target stem>."""
    stem = name.strip() or f"{Path(lora).name}-for-{target.stem}"
    stem = stem[:-len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    if not re.fullmatch(r"[\w][\w .+()\[\]-]{0,150}", stem):
        raise SettingError('Delta Sampling convert "name"', f"{stem!r} is not a plain file name",
                           "Use letters, digits, spaces, '-', '_', '.', '+' and brackets (no folders)")
    return stem + ".safetensors"


def _current_checkpoint() -> str:
    from modules import shared
    return str(getattr(shared.opts, "sd_model_checkpoint", "") or "")


def _lora_folder() -> Path:
    from .files import _lora_dirs
    dirs = _lora_dirs()
    if not dirs:
        raise UserError("Delta Sampling convert", "the WebUI has no LoRA folder (--lora-dir)", "Start it with one")
    return dirs[0]


def _refresh_lora_list() -> None:
    import sys
    networks = sys.modules.get("networks")
    if hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def plan(request: ConvertRequest) -> tuple[Path, Path, Path, Path]:
    """(source, target, lora, out) files for `request`; UserError naming what is wrong, before anything runs."""
    from . import files
    if not 0.0 <= request.threshold <= 1.0:
        raise SettingError('Delta Sampling convert "threshold"', f"{request.threshold!r} is outside 0 to 1",
                           "Use a similarity such as 0.8")
    if not 0 <= request.rank <= 1024:
        raise SettingError('Delta Sampling convert "rank"', f"{request.rank!r} is outside 0 to 1024",
                           "Use 0 (each layer's own rank) or a rank such as 32")
    if not request.source_checkpoint:
        raise SettingError('Delta Sampling convert "source_checkpoint"', "no source base is given",
                           "Choose the base model the LoRA was made for (the accordion's source checkpoint)")
    source = files.checkpoint_file(request.source_checkpoint, 'Delta Sampling convert "source_checkpoint"')
    target_title = request.target_checkpoint or _current_checkpoint()
    target = files.checkpoint_file(target_title, 'Delta Sampling convert "target_checkpoint"')
    lora = files.adapter_file(request.lora)
    out = _lora_folder() / output_name(request.lora, target, request.name)
    if out.exists() and not request.overwrite:
        raise SettingError('Delta Sampling convert "name"', f"{out.name} exists in the LoRA folder",
                           "Choose another name, or allow overwriting")
    if out.resolve() == lora.resolve():
        raise SettingError('Delta Sampling convert "name"', "the output would replace the LoRA being converted",
                           "Choose another name")
    return source, target, lora, out


def start(request: ConvertRequest) -> ConvertJob:
    """Check `request` and start converting in a thread; UserError (nothing started) when it cannot run."""
    from .state import CONVERT_JOB
    job = CONVERT_JOB.get("job")
    if job is not None and job.state == "running":
        raise UserError("Delta Sampling convert", "a conversion is already running", "Wait for it, or cancel it")
    source, target, lora, out = plan(request)
    job = ConvertJob(state="running", message=f"Converting {lora.name} for {target.name}...")
    CONVERT_JOB["job"] = job
    job.thread = threading.Thread(target=_run, args=(job, request, source, target, lora, out),
                                  name="delta-sampling-convert", daemon=True)
    job.thread.start()
    return job


def _run(job: ConvertJob, request: ConvertRequest, source: Path, target: Path, lora: Path, out: Path) -> None:
    from ..bake.cache import SubspaceCache
    from ..bake.convert import convert_lora
    from .hashes import checkpoint_sha256
    from .options import read_options

    def progress(done: int, total: int, name: str) -> None:
        job.done, job.total = done, total

    try:
        from ..runtime.placement import parse_device
        device = parse_device(read_options().device)     # the source models' device (Settings page)
        report = convert_lora(source, target, lora, out, rank=request.rank or None, threshold=request.threshold,
                              device=device, overwrite=request.overwrite, cache=SubspaceCache(),
                              file_sha256=checkpoint_sha256, progress=progress, should_stop=job.cancel.is_set)
        _refresh_lora_list()
        summary = report.summary()
        job.file, job.state = str(out), "done"
        job.message = (f"Wrote {out.name}: {summary['transferred']} of {summary['layers']} layers transferred "
                       f"(similarity min {summary['similarity_min']}, mean {summary['similarity_mean']}). "
                       f"Use it as <lora:{out.stem}:1>.")
        log.info("Delta Sampling: %s", job.message)
    except UserError as exc:
        job.state = "cancelled" if job.cancel.is_set() else "failed"
        job.message = str(exc)
        log.warning("Delta Sampling convert: %s", exc)
    except Exception as exc:  # noqa: BLE001 - shown to the user; the WebUI keeps running
        job.state, job.message = "failed", f"internal error: {type(exc).__name__}: {exc}"
        log.error("Delta Sampling convert failed", exc_info=exc)


def status() -> ConvertJob:
    from .state import CONVERT_JOB
    return CONVERT_JOB.get("job") or ConvertJob()


def cancel() -> ConvertJob:
    job = status()
    if job.state == "running":
        job.cancel.set()
        job.message = "Cancelling..."
    return job


def status_text() -> str:
    job = status()
    progress = f" ({job.done}/{job.total} layers)" if job.state == "running" and job.total else ""
    return f"{job.state}{progress}: {job.message}"


def request_from_json(data: Any) -> ConvertRequest:
    """A ConvertRequest from the route's JSON body; SettingError naming a missing, unknown or mistyped key."""
    fields = ConvertRequest.__dataclass_fields__
    if not isinstance(data, dict):
        raise SettingError("Delta Sampling convert", "the body must be a JSON object",
                           '{"lora": "NAME", "source_checkpoint": "BASE.safetensors"}')
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SettingError("Delta Sampling convert", f"unknown keys {unknown}", f"Known: {', '.join(fields)}")
    types = {"lora": str, "source_checkpoint": str, "target_checkpoint": str, "name": str, "threshold": (int, float),
             "rank": int, "overwrite": bool}
    for key in ("lora", "source_checkpoint"):
        if key not in data:
            raise SettingError(f'Delta Sampling convert "{key}"', "is missing", "Give it in the body")
    for key, value in data.items():
        if not isinstance(value, types[key]) or (key != "overwrite" and isinstance(value, bool)):
            raise SettingError(f'Delta Sampling convert "{key}"', f"{value!r} has the wrong type",
                               f"Use a {getattr(types[key], '__name__', 'number')}")
    return ConvertRequest(**data)


def register_routes(app: Any) -> None:
    """The convert routes on the WebUI's FastAPI app (with the same --api-auth as api.py's route)."""
    from fastapi import Body, HTTPException

    from .api import auth_dependencies

    def post(body: dict = Body(...)):   # noqa: B008 - FastAPI's way to take the JSON body
        try:
            job = start(request_from_json(body))
        except UserError as exc:
            raise HTTPException(status_code=409 if "already running" in str(exc) else 422, detail=str(exc)) from None
        return job.as_dict()

    deps = auth_dependencies()
    app.add_api_route(ROUTE, post, methods=["POST"], status_code=202, dependencies=deps)
    app.add_api_route(ROUTE, lambda: status().as_dict(), methods=["GET"], dependencies=deps)
    app.add_api_route(ROUTE + "/cancel", lambda: cancel().as_dict(), methods=["POST"], dependencies=deps)
