"""`python -m lib_deltasampling inspect`: run as a user runs it, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import factories

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_deltasampling", *args], cwd=ROOT, capture_output=True, text=True)


def test_inspect_describes_each_family(tmp_path: Path):
    paths = [factories.write_checkpoint(tmp_path / f"{f}.safetensors", f, dtype=torch.float16) for f in factories.FAMILIES]
    out = run("inspect", *map(str, paths))
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split(str(tmp_path))[1:]
    assert len(blocks) == 3
    sd1, sd2, sdxl = blocks
    assert "family:      SD1.x" in sd1 and "prediction:  eps (from default)" in sd1
    assert "family:      SD2.x" in sd2 and "probe" in sd2
    assert "family:      SDXL" in sdxl and f"ADM {factories.unet_config('sdxl').adm_in_channels}" in sdxl
    tensors = factories.checkpoint_tensors("sd1")
    n_float = sum(t.is_floating_point() for t in tensors.values())
    assert f"{len(tensors)} tensors" in sd1 and f"float16 x{n_float}" in sd1


def test_user_errors_exit_2_with_one_line(tmp_path: Path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    for args in (["inspect", str(lora)], ["inspect", str(tmp_path / "missing.safetensors")]):
        out = run(*args)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and args[1] in lines[0]
        assert "Traceback" not in out.stderr


def test_inspect_adapters_and_embeddings(tmp_path: Path):
    from test_adapters import build_adapter

    adapter, _ = build_adapter("sdxl", "kohya", "loha", factories.checkpoint_tensors("sdxl", seed=5))
    save_file(adapter, str(tmp_path / "xl_loha.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(3, 768)}, "name": "ignored", "step": 5}, tmp_path / "myemb.pt")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xlemb.safetensors"))
    out = run("inspect", *(str(tmp_path / n) for n in ("xl_loha.safetensors", "myemb.pt", "xlemb.safetensors")))
    assert out.returncode == 0, out.stderr
    lora, emb, xlemb = out.stdout.split(str(tmp_path))[1:]
    n_unet = sum(k.startswith("lora_unet_") and k.endswith("hada_w1_a") for k in adapter)
    assert "kind:        adapter" in lora and "family:      SDXL" in lora and f"loha x{len(adapter) // 5}" in lora
    assert f"unet {n_unet}" in lora and "te2 3" in lora  # te2 prefix -> SDXL, whatever the widths
    assert "name:        myemb" in emb and "vectors:     3" in emb and "SD1.x embedding (width 768)" in emb
    assert "format:      clip_l/clip_g" in xlemb and "an SDXL embedding" in xlemb


# Run as a user would before installing the runtime: torch, safetensors and numpy cannot be imported.
NO_RUNTIME = ("import sys\n"
              "for name in ('torch', 'safetensors', 'numpy'):\n"
              "    sys.modules[name] = None\n"
              "from lib_deltasampling.__main__ import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


def test_help_works_without_torch():
    for args, words in ((["--help"], "generate"), (["generate", "--help"], "--scale FLOAT"),
                        (["inspect", "--help"], "checkpoints")):
        out = subprocess.run([sys.executable, "-c", NO_RUNTIME, *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and words in out.stdout and "Traceback" not in out.stderr, out.stderr


def test_generate_help_states_each_default_once_and_offers_no_hires():
    out = subprocess.run([sys.executable, "-c", NO_RUNTIME, "generate", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "Default: 1.0. --start" in text and "Default: empty." in text and "(default: 20)" in text
    assert "--hires" not in text and "1 to 150" in text and "--overwrite" in text


def test_the_runners_sampler_lists_in_help_are_the_ones_it_has():
    from lib_deltasampling.runner.cli import SAMPLER_NAMES, SCHEDULE_LABELS
    from lib_deltasampling.runner.sampling import SAMPLERS, SCHEDULES
    assert tuple(SAMPLERS) == SAMPLER_NAMES and tuple(SCHEDULES) == SCHEDULE_LABELS
