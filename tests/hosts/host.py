"""A real WebUI process for the tests: prepared from ../shared/hosts, started on 127.0.0.1, driven over HTTP.

    host = WebUI(data_dir, ckpt_dir, lora_dir, flavour="forge")   # "a1111", "forge" or "neo"
    host.start(checkpoint="a-target-sd15.safetensors")
    info = host.txt2img(prompt="a fox", steps=2, width=64, height=64, ds={"scale": 2, ...})
    host.stop()

Everything the host writes (config.json, cache.json, outputs) goes into `data_dir` (`--data-dir`,
in all three), so the unpacked tree in the cache stays as it was shipped. The extension is linked
into `data_dir/extensions/`, as a user's clone would be; so is `probe/` (a test-only extension that
records what the CFG callbacks see, when `record=True`). The console goes to `data_dir/console.log`.

A host tree other than the shipped one (a fetched Forge, a newer Neo) is used with
DS_FORGE_TREE / DS_NEO_TREE=<its folder> (setup_forge.sh builds its venv from that tree).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_HOSTS = Path(os.environ.get("DS_SHARED_HOSTS", REPO.parent / "shared" / "hosts"))
# as setup_a1111.sh: not under a dot-folder, where gradio refuses to serve the WebUI's own files
CACHE = Path(os.environ.get("DS_HOSTS_CACHE", "/var/tmp/sd-webui-delta-sampling/hosts"))
SCRIPT_TITLE = "Delta Sampling"


PROBE = Path(__file__).resolve().parent / "probe"


@dataclass(frozen=True)
class Flavour:
    """How one WebUI is prepared and started (../shared/hosts/README.md's CPU recipes)."""
    name: str
    tarball: str | None                     # in ../shared/hosts; None: only a tree of your own (DS_<NAME>_TREE)
    args: tuple[str, ...]                   # besides --port, --data-dir and the model folders
    ckpt_flag: str = "--ckpt-dir"
    lora_flag: str = "--lora-dir"
    ready: str = "Model loaded in"          # A1111 loads the model at start; Forge on first use

    @property
    def tree_override(self) -> str | None:
        """DS_FORGE_TREE / DS_NEO_TREE / DS_REFORGE_TREE: run that tree instead of the shipped one."""
        return os.environ.get(f"DS_{self.name.upper()}_TREE") if self.name != "a1111" else None

    @property
    def root(self) -> Path:
        return Path(self.tree_override) if self.tree_override else CACHE / self.name

    @property
    def python(self) -> Path:
        return CACHE / f"{self.name}-venv" / "bin" / "python"

    def prepare(self) -> Path:
        """Unpack the tree and install its venv (cached; the first run takes a few minutes)."""
        script = {"a1111": "setup_a1111.sh", "reforge": "setup_reforge.sh"}.get(self.name, "setup_forge.sh")
        host_arg = [self.name] if script == "setup_forge.sh" else []
        subprocess.run(["bash", str(REPO / "tests" / "hosts" / script), *host_arg, str(SHARED_HOSTS), str(CACHE)],
                       check=True, stdout=subprocess.DEVNULL)
        return self.root

    def config(self) -> dict:
        if self.name != "neo":
            return {}
        # Neo asks for Enter at start unless config.json carries its VERSION_UID (launch_utils.verify_version)
        text = (self.root / "modules" / "launch_utils.py").read_text()
        return {"VERSION_UID": re.search(r'^VERSION_UID\b[^=]*=\s*"([^"]+)"', text, re.M).group(1)}


_A1111_ARGS = ("--skip-prepare-environment", "--skip-version-check", "--api", "--skip-torch-cuda-test",
               "--no-half", "--use-cpu", "all", "--no-download-sd-model")
_FORGE_COMMON = ("--skip-torch-cuda-test", "--skip-prepare-environment", "--skip-python-version-check",
                 "--skip-version-check", "--api", "--server-name", "127.0.0.1")
FLAVOURS = {
    "a1111": Flavour("a1111", "a1111-v1.10.1.tar.gz", _A1111_ARGS),
    # reForge: A1111's flags plus ldm_patched's --always-cpu (without it start-up asks CUDA for a device);
    # it prints "Model <name> [hash] loaded in", not "Model loaded in"
    "reforge": Flavour("reforge", None, (*_A1111_ARGS, "--always-cpu"), ready="loaded in"),
    "forge": Flavour("forge", "forge-dfdcbab6.tar.gz", ("--always-cpu", "--no-download-sd-model", *_FORGE_COMMON),
                     ready="Startup time"),
    # Neo: --cpu for --always-cpu, no --no-download-sd-model, folder lists for --ckpt-dir/--lora-dir
    "neo": Flavour("neo", "forge-neo-2.26.tar.gz", ("--cpu", *_FORGE_COMMON), ckpt_flag="--ckpt-dirs",
                   lora_flag="--lora-dirs", ready="Startup time"),
}


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
class WebUI:
    data_dir: Path
    ckpt_dir: Path
    lora_dir: Path
    flavour: str = "a1111"
    extra_args: tuple[str, ...] = ()
    record: bool = False                     # link probe/ and record the CFG callbacks' tensors
    extensions: tuple[tuple[str, Path], ...] = ()   # other extensions to link in: (folder name, tree)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def kind(self) -> Flavour:
        return FLAVOURS[self.flavour]

    @property
    def root(self) -> Path:
        return self.kind.root

    @property
    def probe_file(self) -> Path:
        return self.data_dir / "probe.pt"

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
        if self.record:
            env["DS_PROBE_FILE"] = str(self.probe_file)
        return env

    def _place_extra_models(self) -> None:
        """The cached ControlNets, IP-Adapters and CLIP vision encoders into the host's own models/
        folders (where users keep them; a symlink out of the folder would be refused): hard links, or
        copies across filesystems."""
        for kind in ("ControlNet", "ipadapter", "clip_vision"):
            cached = self.ckpt_dir.parent / kind
            folder = self.data_dir / "models" / kind
            folder.mkdir(parents=True, exist_ok=True)
            for path in cached.glob("*.safetensors") if cached.is_dir() else []:
                placed = folder / path.name
                if not placed.exists():
                    try:
                        os.link(path, placed)
                    except OSError:
                        shutil.copyfile(path, placed)

    def start(self, checkpoint: str, options: dict | None = None, timeout: float = 600) -> None:
        """Start with `checkpoint` as the WebUI's model and `options` in config.json; wait until ready."""
        (self.data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        links = {"sd-webui-delta-sampling": REPO, **({"ds-probe": PROBE} if self.record else {}),
                 **dict(self.extensions)}
        for name, target in links.items():
            link = self.data_dir / "extensions" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        self._place_extra_models()
        config = {"sd_model_checkpoint": checkpoint, "live_previews_enable": False, "sd_checkpoint_cache": 0,
                  **self.kind.config(), **(options or {})}
        (self.data_dir / "config.json").write_text(json.dumps(config))
        self.port = free_port()
        kind = self.kind
        args = [str(kind.python), "launch.py", *kind.args, "--port", str(self.port), "--data-dir", str(self.data_dir),
                kind.ckpt_flag, str(self.ckpt_dir), kind.lora_flag, str(self.lora_dir), *self.extra_args]
        if self.flavour in ("forge", "neo"):
            # gradio 4 serves /file= only from allowed paths, by default just the data dir: with the data
            # dir outside the tree, the tree's own script.js and the linked extension would answer 403
            args += ["--gradio-allowed-path", str(self.root), "--gradio-allowed-path", str(REPO)]
        log = open(self.console, "ab")
        self.process = subprocess.Popen(args, cwd=self.root, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"{self.flavour} exited with {self.process.returncode}:\n{self.console_tail()}")
            # No request before "Startup time": A1111 1.10 adds its API middleware after the server has
            # started, and starlette refuses that ("Cannot add middleware after an application has
            # started") once any request has built the app's middleware stack (seen once in CI).
            if "Startup time" not in self.console_text():
                time.sleep(1)
                continue
            try:
                if self.get("/sdapi/v1/sd-models").status == 200 and kind.ready in self.console_text():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise HostError(f"{self.flavour} not ready in {timeout} s:\n{self.console_tail()}")

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

    def recorded(self) -> dict:
        """What probe/ recorded in the last generation (`record=True`): see probe/scripts/ds_probe.py."""
        import torch
        return torch.load(self.probe_file, weights_only=False)


A1111 = WebUI  # the A1111 tests' name for it


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
