"""`python -m lib_deltasampling generate` end to end on tiny generated checkpoints and a LoRA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import factories
from lib_deltasampling.__main__ import main
from lib_deltasampling.engine.infotext import parse_parameters, settings_from_infotext
from lib_deltasampling.engine.settings import DeltaSettings
from test_adapters import build_adapter
from vocab import clip_vocab_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch) -> Path:
    """The runner's hash cache in this test's folder, not the user's ~/.cache."""
    path = tmp_path / "hash-cache" / "hashes.json"
    monkeypatch.setenv("DELTA_SAMPLING_HASH_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runner")
    (d / "lora").mkdir()
    adapter, _ = build_adapter("sd1", "kohya", "lora", factories.checkpoint_tensors("sd1", seed=5))
    save_file(adapter, str(d / "lora" / "moxin.safetensors"))
    xl_adapter, _ = build_adapter("sdxl", "kohya", "lora", factories.checkpoint_tensors("sdxl", seed=5))
    save_file(xl_adapter, str(d / "lora" / "xl_style.safetensors"))
    return {"dir": d,
            "target": factories.write_checkpoint(d / "target_xl.safetensors", "sdxl", seed=1, vae=True),
            "source": factories.write_checkpoint(d / "source_sd1.safetensors", "sd1", seed=5)}


def generate(files, out: Path, *extra: str) -> int:
    return main(["generate", "--target", str(files["target"]), "--source", str(files["source"]),
                 "--lora-dir", str(files["dir"] / "lora"), "--vocab", str(clip_vocab_path()), "--device", "cpu",
                 "--prompt", "a fox in the snow", "--negative", "blurry", "--steps", "3", "--width", "64",
                 "--height", "64", "--seed", "7", "--quiet", "--out", str(out), *extra])


DS_FLAGS = ["--adapters", '<lora:moxin:0.8:1.1> shuimo, "ink", wash', "--scale", "2.5", "--start", "0.1",
            "--end", "0.9", "--schedule", "cosine", "--source-cfg", "4", "--guidance", "full", "--reuse", "2",
            "--source-prompt", "a fox, (snow:1.2)"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_png_infotext_parses_back_to_the_settings_used(files, tmp_path):
    out = tmp_path / "fox.png"
    assert generate(files, out, *DS_FLAGS) == 0
    text = Image.open(out).info["parameters"]  # what the WebUI's PNG Info reads
    prompt, negative, params = parse_parameters(text)
    assert (prompt, negative) == ("a fox in the snow", "blurry")
    assert params["Steps"] == "3" and params["Sampler"] == "Euler" and params["Seed"] == "7" and params["Size-1"] == "64"
    restored, warnings = settings_from_infotext(params)
    assert warnings == []
    assert restored == DeltaSettings(enabled=True, source_checkpoint="source_sd1.safetensors",
                                     adapters='<lora:moxin:0.8:1.1> shuimo, "ink", wash', scale=2.5, start=0.1,
                                     end=0.9, schedule="cosine", source_cfg=4.0, guidance="full", reuse=2,
                                     source_prompt="a fox, (snow:1.2)")
    assert len(params["Delta source hash"]) == 10 and "moxin: " in params["Delta adapter hashes"]


def test_compare_writes_both_and_same_seed_gives_the_same_image(files, tmp_path):
    assert generate(files, tmp_path / "a.png", "--compare", "--adapters", "<lora:moxin:1>", "--scale", "3") == 0
    assert generate(files, tmp_path / "b.png", "--adapters", "<lora:moxin:1>", "--scale", "3") == 0
    with_delta, without = pixels(tmp_path / "a.png"), pixels(tmp_path / "a-nodelta.png")
    assert np.array_equal(with_delta, pixels(tmp_path / "b.png"))        # same seed, same image
    assert not np.array_equal(with_delta, without)                        # the delta did something
    plain = Image.open(tmp_path / "a-nodelta.png").info["parameters"]
    assert "Delta" not in plain and "Seed: 7" in plain


def test_scale_zero_is_exactly_the_target_alone(files, tmp_path):
    assert generate(files, tmp_path / "z.png", "--compare", "--adapters", "<lora:moxin:1>", "--scale", "0") == 0
    assert np.array_equal(pixels(tmp_path / "z.png"), pixels(tmp_path / "z-nodelta.png"))


def test_batch_seeds_and_latent_out(files, tmp_path):
    lat = tmp_path / "latents" / "new" / "lat.safetensors"  # folders that do not exist yet are made
    assert generate(files, tmp_path / "b.png", "--batch", "2", "--sampler", "Euler a", "--latent-out", str(lat),
                    "--adapters", "<lora:moxin:1>") == 0
    first, second = tmp_path / "b-1.png", tmp_path / "b-2.png"
    assert "Seed: 7," in Image.open(first).info["parameters"] and "Seed: 8," in Image.open(second).info["parameters"]
    assert "Delta hires" not in Image.open(first).info["parameters"]  # the runner has no hires pass
    assert not np.array_equal(pixels(first), pixels(second))
    latent = load_file(str(lat))["latent"]
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()
    # image 2 of the batch is the image its own seed gives alone (A1111: one generator per image seed)
    assert generate(files, tmp_path / "c.png", "--seed", "8", "--sampler", "Euler a", "--adapters", "<lora:moxin:1>") == 0
    alone = pixels(tmp_path / "c.png").astype(int)
    assert np.abs(alone - pixels(second).astype(int)).max() <= 1  # batch-size-dependent kernels may round apart


@pytest.mark.parametrize("extra, words", [
    (["--scale", "nan"], 'Delta scale" (scale)'),
    (["--scale", "1e9"], "outside -10 to 10"),
    (["--start", "0.8", "--end", "0.2"], "start"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1000000"], "--steps: 1000000 is outside 1 to 150"),      # A1111's own limits
    (["--batch", "10000"], "--batch: 10000 is outside 1 to 8"),
    (["--width", "100000"], "from 64 to 2048"),
    (["--cfg", "-5"], "--cfg: -5.0 is not a CFG scale from 0 to 30"),
    (["--cfg", "inf"], "--cfg"),
    (["--seed", str(2 ** 70)], "seed: 1180591620717411303424 is outside"),  # torch's manual_seed range
    (["--width", "65"], "--width"),
    (["--sampler", "Heun++"], "Sampler"),
    (["--schedule-type", "Wobbly"], "Schedule type"),
    (["--adapters", "<lora:missing:1>"], "no file missing{"),
    (["--adapters", "<lora:xl_style:1>"], "SDXL adapter"),
    (["--latent-out", "lat.pt"], "--latent-out: 'lat.pt' is not a .safetensors file name"),
])
def test_user_errors_exit_2_with_one_clear_line(files, tmp_path, capsys, extra, words):
    assert generate(files, tmp_path / "x.png", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_missing_file_as_a_user_runs_it(files, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lib_deltasampling", "generate", "--target", str(tmp_path / "no.safetensors"),
                          "--source", str(files["source"]), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'no.safetensors'}: file not found. Give --target the path of a model file"]
