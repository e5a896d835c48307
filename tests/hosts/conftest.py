"""Fixtures of the real-host suite: the test models (written once, cached) and one running host at a time.

Collected only with DS_REAL_HOSTS=1 (tests/conftest.py); `.ci/run` sets it when ../shared/hosts exists.
With DS_REAL_HOSTS=1 and no shared hosts folder the suite fails: nothing is skipped silently.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import models
from host import A1111, CACHE, SHARED_HOSTS, prepare_a1111

from models import LORA, MODELS_VERSION, SOURCE, TARGET


def model_dir() -> Path:
    return CACHE / f"models-v{MODELS_VERSION}"


def ensure_file(path: Path, write) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return path


@pytest.fixture(scope="session")
def a1111_root() -> Path:
    if not (SHARED_HOSTS / "a1111-v1.10.1.tar.gz").is_file():
        pytest.fail(f"DS_REAL_HOSTS=1 but {SHARED_HOSTS} has no a1111-v1.10.1.tar.gz (set DS_SHARED_HOSTS)")
    return prepare_a1111()


@pytest.fixture(scope="session")
def sd15_models() -> dict[str, Path]:
    d = model_dir()
    return {
        "target": ensure_file(d / "Stable-diffusion" / TARGET, lambda p: models.write_checkpoint(p, "sd15", seed=1)),
        "source": ensure_file(d / "Stable-diffusion" / SOURCE, lambda p: models.write_checkpoint(p, "sd15", seed=2)),
        "lora": ensure_file(d / "Lora" / f"{LORA}.safetensors", lambda p: models.write_lora(p, seed=3)),
    }


class Hosts:
    """At most one host process at a time (a host holds 5-15 GB; the machine has 24)."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root, self.base = root, base
        self.running: tuple[str, A1111] | None = None
        self.count = 0

    def get(self, name: str, checkpoint: str, options: dict | None = None, fresh: bool = False,
            extra_args: tuple[str, ...] = ()) -> A1111:
        if self.running and self.running[0] == name and not fresh:
            return self.running[1]
        self.stop()
        self.count += 1
        data = self.base / f"{self.count}-{name}"
        host = A1111(data_dir=data, ckpt_dir=model_dir() / "Stable-diffusion", lora_dir=model_dir() / "Lora",
                     root=self.root, extra_args=extra_args)
        self.running = (name, host)
        host.start(checkpoint, options)
        return host

    def stop(self) -> None:
        if self.running:
            self.running[1].stop()
            self.running = None


@pytest.fixture(scope="session")
def hosts(a1111_root: Path, sd15_models, tmp_path_factory) -> Iterator[Hosts]:
    pool = Hosts(a1111_root, tmp_path_factory.mktemp("hosts"))
    yield pool
    pool.stop()


@pytest.fixture
def real_a1111(hosts: Hosts) -> A1111:
    """The shared SD1.5 host (A1111 1.10.1, CPU, fp32), started on first use."""
    host = hosts.get("sd15", TARGET)
    if host.process is None or host.process.poll() is not None:
        host = hosts.get("sd15", TARGET, fresh=True)
    return host


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
