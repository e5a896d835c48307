"""A real WebUI process for the tests: prepared from ../shared/hosts, started on 127.0.0.1, driven over HTTP.

    host = A1111(cache, data_dir, models)   # models: ckpt and LoRA folders
    host.start(checkpoint="a-target-sd15.safetensors")
    info = host.txt2img(prompt="a fox", steps=2, width=64, height=64, ds={"scale": 2, ...})
    host.stop()

Everything the host writes (config.json, cache.json, outputs) goes into `data_dir` (A1111's
`--data-dir`), so the unpacked tree in the cache stays as it was shipped. The extension is linked
into `data_dir/extensions/`, as a user's clone would be. The console goes to `data_dir/console.log`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_HOSTS = Path(os.environ.get("DS_SHARED_HOSTS", REPO.parent / "shared" / "hosts"))
# as setup_a1111.sh: not under a dot-folder, where gradio refuses to serve the WebUI's own files
CACHE = Path(os.environ.get("DS_HOSTS_CACHE", "/var/tmp/sd-webui-delta-sampling/hosts"))
SCRIPT_TITLE = "Delta Sampling"


def prepare_a1111() -> Path:
    """Unpack A1111 and install its venv (cached; the first run takes a few minutes)."""
    subprocess.run(["bash", str(REPO / "tests" / "hosts" / "setup_a1111.sh"), str(SHARED_HOSTS), str(CACHE)],
                   check=True, stdout=subprocess.DEVNULL)
    return CACHE / "a1111"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostError(RuntimeError):
    pass


@dataclass
class HttpResult:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class A1111:
    data_dir: Path
    ckpt_dir: Path
    lora_dir: Path
    root: Path = field(default_factory=lambda: CACHE / "a1111")
    python: Path = field(default_factory=lambda: CACHE / "a1111-venv" / "bin" / "python")
    extra_args: tuple[str, ...] = ()
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def console(self) -> Path:
        return self.data_dir / "console.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST"))}
        env.update(HF_HOME=str(CACHE / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        return env

    def start(self, checkpoint: str, options: dict | None = None, timeout: float = 600) -> None:
        """Start with `checkpoint` as the WebUI's model and `options` in config.json; wait until ready."""
        (self.data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        link = self.data_dir / "extensions" / "sd-webui-delta-sampling"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        config = {"sd_model_checkpoint": checkpoint, "live_previews_enable": False, "sd_checkpoint_cache": 0,
                  **(options or {})}
        (self.data_dir / "config.json").write_text(json.dumps(config))
        self.port = free_port()
        args = [str(self.python), "launch.py", "--skip-prepare-environment", "--skip-version-check", "--api",
                "--skip-torch-cuda-test", "--no-half", "--use-cpu", "all", "--no-download-sd-model",
                "--port", str(self.port), "--data-dir", str(self.data_dir), "--ckpt-dir", str(self.ckpt_dir),
                "--lora-dir", str(self.lora_dir), *self.extra_args]
        log = open(self.console, "ab")
        self.process = subprocess.Popen(args, cwd=self.root, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"A1111 exited with {self.process.returncode}:\n{self.console_tail()}")
            try:
                if self.get("/sdapi/v1/sd-models").status == 200 and "Model loaded in" in self.console_text():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise HostError(f"A1111 not ready in {timeout} s:\n{self.console_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None

    # ------------------------------------------------------------------ console
    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def console_tail(self, n: int = 60) -> str:
        return "\n".join(self.console_text().splitlines()[-n:])

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 900) -> HttpResult:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return HttpResult(r.status, r.read())
        except urllib.error.HTTPError as e:
            return HttpResult(e.code, e.read())

    def get(self, path: str, timeout: float = 30) -> HttpResult:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 900) -> HttpResult:
        return self.request("POST", path, body, timeout=timeout)

    def generate(self, mode: str, ds: dict | list | None = None, scripts: dict | None = None, **payload) -> "Generation":
        """POST /sdapi/v1/{txt2img,img2img}; `ds` is the Delta Sampling script args (dict form or list)."""
        alwayson = dict(scripts or {})
        if ds is not None:
            alwayson[SCRIPT_TITLE] = {"args": [ds] if isinstance(ds, dict) else ds}
        body = {"seed": 1, "steps": 2, "width": 64, "height": 64, "cfg_scale": 5, "sampler_name": "Euler",
                **payload, "alwayson_scripts": alwayson}
        started = time.monotonic()
        result = self.post(f"/sdapi/v1/{mode}", body)
        if result.status != 200:
            raise HostError(f"{mode} answered {result.status}: {result.body[:2000]!r}\n{self.console_tail()}")
        return Generation(result.json(), time.monotonic() - started)

    def txt2img(self, ds: dict | list | None = None, **payload) -> "Generation":
        return self.generate("txt2img", ds, **payload)

    def img2img(self, ds: dict | list | None = None, **payload) -> "Generation":
        return self.generate("img2img", ds, **payload)


@dataclass
class Generation:
    response: dict
    seconds: float

    @property
    def info(self) -> dict:
        return json.loads(self.response["info"])

    @property
    def infotexts(self) -> list[str]:
        return self.info["infotexts"]

    @property
    def params(self) -> dict:
        return self.info["extra_generation_params"]

    def images(self):
        """The images as uint8 numpy arrays (PIL decodes the PNGs)."""
        import numpy as np
        from PIL import Image
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")).astype(np.int16)
                for b in self.response["images"]]

    def image(self, i: int = 0):
        return self.images()[i]

    def png_b64(self, i: int = 0) -> str:
        return self.response["images"][i]
