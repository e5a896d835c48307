"""Fixtures of the real-host suite: the test models (written once, cached) and one running host at a time.

Collected only with DS_REAL_HOSTS=1 (tests/conftest.py); `.ci/run` sets it when ../shared/hosts exists.
With DS_REAL_HOSTS=1 and no shared hosts folder the suite fails: nothing is skipped silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import models
from host import CACHE, FLAVOURS, SHARED_HOSTS, WebUI

from models import CLIP_VISION, CONTROLNET, IPADAPTER, LORA, MODELS_VERSION, SOURCE, TARGET


def model_dir() -> Path:
    return CACHE / f"models-v{MODELS_VERSION}"


def ensure_file(path: Path, write) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return path


@pytest.fixture(scope="session")
def sd15_models() -> dict[str, Path]:
    d = model_dir()
    return {
        "target": ensure_file(d / "Stable-diffusion" / TARGET, lambda p: models.write_checkpoint(p, "sd15", seed=1)),
        "source": ensure_file(d / "Stable-diffusion" / SOURCE, lambda p: models.write_checkpoint(p, "sd15", seed=2)),
        "lora": ensure_file(d / "Lora" / f"{LORA}.safetensors", lambda p: models.write_lora(p, seed=3)),
        "controlnet": ensure_file(d / "ControlNet" / f"{CONTROLNET}.safetensors",
                                  lambda p: models.write_controlnet(p, seed=4)),
        "ipadapter": ensure_file(d / "ipadapter" / f"{IPADAPTER}.safetensors",
                                 lambda p: models.write_ip_adapter(p, seed=5)),
        "clip_vision": ensure_file(d / "clip_vision" / f"{CLIP_VISION}.safetensors",
                                   lambda p: models.write_clip_vision(p, seed=6)),
    }


class Hosts:
    """At most one host process at a time (a host holds 5-15 GB; the machine has 24)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: tuple[str, WebUI] | None = None
        self.count = 0

    def get(self, name: str, checkpoint: str, options: dict | None = None, fresh: bool = False,
            extra_args: tuple[str, ...] = (), flavour: str = "a1111", record: bool = False,
            extensions: tuple[tuple[str, Path], ...] = ()) -> WebUI:
        if self.running and self.running[0] == name and not fresh:
            return self.running[1]
        self.stop()
        prepared(flavour)
        self.count += 1
        data = self.base / f"{self.count}-{name}"
        host = WebUI(data_dir=data, ckpt_dir=model_dir() / "Stable-diffusion", lora_dir=model_dir() / "Lora",
                     flavour=flavour, extra_args=extra_args, record=record, extensions=extensions)
        self.running = (name, host)
        host.start(checkpoint, options)
        return host

    def stop(self) -> None:
        if self.running:
            self.running[1].stop()
            self.running = None


@pytest.fixture(scope="session")
def hosts(sd15_models, tmp_path_factory) -> Iterator[Hosts]:
    pool = Hosts(tmp_path_factory.mktemp("hosts"))
    yield pool
    pool.stop()


@pytest.fixture
def real_a1111(hosts: Hosts) -> WebUI:
    """The shared SD1.5 host (A1111 1.10.1, CPU, fp32), started on first use."""
    host = hosts.get("sd15", TARGET)
    if host.process is None or host.process.poll() is not None:
        host = hosts.get("sd15", TARGET, fresh=True)
    return host


def prepared(flavour: str) -> Path:
    kind = FLAVOURS[flavour]
    if kind.tarball is None and not kind.tree_override:
        pytest.fail(f"no {flavour} tree: set DS_{flavour.upper()}_TREE")
    if not kind.tree_override and not (SHARED_HOSTS / kind.tarball).is_file():
        pytest.fail(f"DS_REAL_HOSTS=1 but {SHARED_HOSTS} has no {kind.tarball} (set DS_SHARED_HOSTS)")
    return kind.prepare()


# reForge's tree is not shipped in ../shared/hosts: it joins when DS_REFORGE_TREE names a checkout
FORGE_FAMILY = ["forge", "neo", *(["reforge"] if os.environ.get("DS_REFORGE_TREE") else [])]


@pytest.fixture(scope="module", params=FORGE_FAMILY)
def forge_family(request, hosts: Hosts) -> WebUI:
    """Forge (main dfdcbab), Forge Neo (2.26) [and reForge], CPU, with probe/ recording the CFG callbacks;
    one after the other (module scope: every test of a module runs in Forge, then in Neo)."""
    return hosts.get(request.param, TARGET, flavour=request.param, record=True)


@pytest.fixture
def forge_host(forge_family: WebUI, hosts: Hosts) -> WebUI:
    if forge_family.process is None or forge_family.process.poll() is not None:
        return hosts.get(forge_family.flavour, TARGET, flavour=forge_family.flavour, record=True, fresh=True)
    return forge_family


@pytest.fixture
def chrome():
    """Headless Chromium through Selenium (browser.py), closed after the test."""
    from browser import start_chrome
    driver = start_chrome()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots and logs of the real-host suite are kept (tests/hosts/artifacts, git-ignored)."""
    d = Path(__file__).parent / "artifacts"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session", autouse=True)
def _disk_check() -> None:
    free = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else Path.home()).free
    if free < 12 * 1024 ** 3:
        pytest.fail(f"the real-host suite needs ~12 GB free under {CACHE} (models, venv); {free / 2**30:.1f} GB free")
