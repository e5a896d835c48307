"""The quality lab (lib_deltasampling/lab): the world's images and labels by hand, the miniature
checkpoints against the ldm key spec and the runtime's own detection, the VAE's latent rescaling,
the LoRA trainer's file against the runtime's adapter loader, the metrics by hand, and the whole
pipeline (train -> study -> demo) at a tiny size."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import factories
from lib_deltasampling.lab import minis, world
from lib_deltasampling.lab.lora import LoraNetwork, lora_layers
from lib_deltasampling.runtime.checkpoint import open_store
from lib_deltasampling.runtime.detect import detect_model

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- world

def test_render_puts_each_colour_where_the_caption_says():
    scene = world.Scene("above", (("square", "red"), ("circle", "blue")), "sand")
    assert scene.caption() == "a red square above a blue circle, on sand"
    img = world.render(scene, 64, np.random.default_rng(0)).astype(int)
    top, bottom = img[17, 32], img[47, 32]          # the centres (0.27 and 0.73 of the side, +- jitter)
    assert np.abs(top - world.COLOURS["red"]).max() <= 2 and np.abs(bottom - world.COLOURS["blue"]).max() <= 2
    corner = img[1, 1]                               # background tone is jittered by at most -7 % / +5 %
    assert np.all(np.abs(corner - np.array(world.BACKGROUNDS["sand"])) <= 0.07 * 255)


def test_stripes_keep_the_colour_add_white_and_a_black_outline():
    plain = world.Scene("single", (("square", "green"),), "sky")
    striped = dataclasses.replace(plain, style="stripes")
    a = world.render(plain, 64, np.random.default_rng(3)).astype(int)
    b = world.render(striped, 64, np.random.default_rng(3)).astype(int)
    inside = b[24:40, 24:40].reshape(-1, 3)
    near = lambda px, c: np.abs(px - np.array(c)).max(axis=-1) <= 12   # noqa: E731
    assert near(inside, world.COLOURS["green"]).mean() > 0.25 and near(inside, (255, 255, 255)).mean() > 0.25
    assert np.all(near(a[24:40, 24:40].reshape(-1, 3), world.COLOURS["green"]))
    row = b[32]
    assert row.sum(axis=-1).min() < 60                # the outline crosses the middle row


def test_the_zorb_is_a_cross_and_labels_index_the_heads():
    scene = world.Scene("single", (("zorb", "yellow"),), "night")
    img = world.render(scene, 64, np.random.default_rng(0)).astype(int)
    c = img[32, 32]
    assert np.abs(c - world.COLOURS["yellow"]).max() <= 2
    # a cross: a point on a diagonal, 0.2 of the side from the centre, is background
    assert np.abs(img[32 + 13, 32 + 13] - np.array(world.BACKGROUNDS["night"])).max() <= 20
    labels = scene.labels()
    assert labels == {"layout": 0, "shape1": 3, "colour1": 3, "shape2": 0, "colour2": 0, "background": 2, "style": 0}
    assert all(0 <= labels[h] < n for h, n in world.HEADS.items())


# ---------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", list(minis.SPECS))
def test_mini_checkpoints_are_real_layouts_the_runtime_detects(tmp_path: Path, name: str):
    spec = minis.SPECS[name]
    path = minis.write_checkpoint(tmp_path / f"{name}.safetensors", spec, minis.build_unet(spec),
                                  minis.AutoencoderKL(spec.vae), minis.text_tensors(spec))
    store = open_store(path)
    info = detect_model(store)
    assert info.family.value == spec.family and info.unet == spec.unet and info.has_vae
    # the VAE part, key for key and shape for shape, against the ldm spec written out in tests/factories.py
    want = factories.vae_shapes(ch=spec.vae.ch, ch_mult=spec.vae.ch_mult, num_res_blocks=spec.vae.num_res_blocks)
    vae = store.sub("first_stage_model.")
    assert {k: tuple(vae.shape(k)) for k in vae.keys()} == want


def test_rescaling_the_latent_space_keeps_what_the_vae_computes():
    torch.manual_seed(0)
    vae = minis.AutoencoderKL(minis.SD1_VAE).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.moments(x)
        out = vae.decode(mean)
        vae.rescale_latents(2.5)
        mean2, logvar2 = vae.moments(x)
        out2 = vae.decode(mean2)
    assert torch.allclose(mean2, 2.5 * mean, atol=1e-5)
    assert torch.allclose(logvar2, logvar + 2 * math.log(2.5), atol=1e-4)   # std scales with the mean
    assert torch.allclose(out2, out, atol=1e-4)


def test_text_encoders_zero_unused_words_and_keep_emphasis_finite(tmp_path: Path, tokenizer):
    spec = minis.SPECS["sdxl"]
    from lib_deltasampling.lab.train import used_tokens
    keep = used_tokens(tokenizer)
    text = minis.text_tensors(spec, keep)
    emb = text["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]
    nonzero = set(torch.nonzero(emb.abs().sum(1)).flatten().tolist())
    assert nonzero == keep and tokenizer.encode("zorb")[0] in keep
    path = minis.write_checkpoint(tmp_path / "m.safetensors", spec, minis.build_unet(spec),
                                  minis.AutoencoderKL(spec.vae), text)
    from lib_deltasampling.runtime.model import load_model
    from lib_deltasampling.runtime.placement import Placement
    model = load_model(path, placement=Placement("cpu", torch.float32), tokenizer=tokenizer)
    cond = model.encode(["a red circle on sand", ""], width=64, height=64)
    assert all(bool(v.isfinite().all()) for v in cond.values())


def test_a_trained_lora_file_loads_through_the_runtime_as_the_hooks_computed(tmp_path: Path, tokenizer):
    from lib_deltasampling.runtime.adapters.apply import AdapterSet
    from lib_deltasampling.runtime.adapters.keys import KeyMap
    from lib_deltasampling.runtime.model import load_model
    from lib_deltasampling.runtime.placement import Placement
    spec = minis.SPECS["sd1"]
    path = minis.write_checkpoint(tmp_path / "sd1.safetensors", spec, minis.build_unet(spec),
                                  minis.AutoencoderKL(spec.vae), minis.text_tensors(spec))
    model = load_model(path, placement=Placement("cpu", torch.float32), tokenizer=tokenizer)
    unet = model.unet
    torch.manual_seed(1)
    with torch.no_grad():      # an untrained mini UNet has a zero output conv: give it one that shows changes
        unet.out[2].weight.normal_(0, 0.05)
    net = LoraNetwork(unet, lora_layers(unet), rank=4, alpha=2.0)
    with torch.no_grad():
        for up in net.up:
            up.normal_(0, 0.05)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 77, 64)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        net.attach()
        hooked = unet(x, t, ctx)
        net.detach()
    # by hand: W + (alpha / rank) up @ down merged into every adapted Linear gives the hooked output
    merged = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n in net.names}
    with torch.no_grad():
        modules = dict(unet.named_modules())
        for name, down, up in zip(net.names, net.down, net.up):
            modules[name].weight += 0.5 * up @ down
        by_hand = unet(x, t, ctx)
        for name, w in merged.items():
            modules[name].weight.copy_(w)
    assert torch.allclose(hooked, by_hand, atol=1e-4) and not torch.allclose(hooked, plain, atol=1e-3)
    from safetensors.torch import save_file
    lora = tmp_path / "style.safetensors"
    tensors = net.kohya_tensors(KeyMap.build("sd1", unet, {}))
    assert all(k.startswith("lora_unet_") for k in tensors)
    save_file(tensors, str(lora))
    adapters = AdapterSet(model.components(), model.family)
    adapters.add(lora, name="style")
    with torch.no_grad(), adapters.applied():
        loaded = unet(x, t, ctx)
    assert torch.allclose(loaded, by_hand, atol=2e-3)   # the file stores fp16


# ---------------------------------------------------------------------------- metrics

class _Oracle(torch.nn.Module):
    """A 'classifier' that answers from given labels: one-hot logits, some heads wrong on purpose."""

    def __init__(self, labels: dict[str, torch.Tensor], wrong: dict[str, int]) -> None:
        super().__init__()
        self.labels, self.wrong = labels, wrong
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = {}
        for head, n in world.HEADS.items():
            lab = self.labels[head].clone()
            lab[: self.wrong.get(head, 0)] = (lab[: self.wrong.get(head, 0)] + 1) % n
            out[head] = torch.nn.functional.one_hot(lab, n).float() * 20
        return out


def test_content_accuracy_and_scores_by_hand():
    from lib_deltasampling.lab.metrics import evaluate, label_tensors
    S = world.Scene
    scenes = [S("single", (("circle", "red"),), "sand", "stripes"),
              S("above", (("square", "blue"), ("triangle", "green")), "sky", "stripes"),
              S("left", (("triangle", "yellow"), ("circle", "red")), "snow", "stripes"),
              S("single", (("square", "green"),), "night", "stripes")]
    labels = label_tensors(scenes)
    got = evaluate(_Oracle(labels, {"shape1": 2, "background": 1}), np.zeros((4, 64, 64, 3), np.uint8), scenes)
    # 6 content heads x 4 images = 24 answers, 3 wrong
    assert got["content"] == pytest.approx(21 / 24)
    assert got["style"] == pytest.approx(1.0, abs=1e-6)       # all striped, answered right
    assert got["concept"] < 1e-6        # the wrong shapes are circle -> square, square -> triangle: no zorb


def test_demo_prompts_parse_back_to_their_scenes():
    from lib_deltasampling.lab.demo import PROMPTS, _scene
    assert [_scene(p).caption() for p in PROMPTS] == list(PROMPTS)


def test_schedule_shapes_for_the_study_include_sigmoid():
    from lib_deltasampling.engine.settings import DeltaSettings
    assert DeltaSettings(enabled=True, source_checkpoint="a", schedule="sigmoid").to_params().shape == "sigmoid"


# ---------------------------------------------------------------------------- the pipeline, tiny

@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory, clip_vocab) -> Path:
    """Every stage of lab/train.py at a tiny size (minutes of training cut to a few steps each)."""
    from lib_deltasampling.lab import train
    out = tmp_path_factory.mktemp("minis")
    plan = dataclasses.replace(train.PRESETS["quick"], base_images=120, style_images=60, concept_images=40,
                               vae_steps=2, vae_batch=4, unet_steps=3, unet_batch=8, lora_steps=2, lora_batch=8,
                               classifier_steps=2, classifier_batch=8)
    train.PRESETS["test"] = plan
    try:
        train.main(["--out", str(out), "--preset", "test", "--device", "cpu", "--workers", "1", "--vocab", str(clip_vocab)])
    finally:
        del train.PRESETS["test"]
    return out


def test_training_writes_every_model_and_resumes(tiny_lab: Path, clip_vocab, capsys):
    names = sorted(p.relative_to(tiny_lab).as_posix() for p in tiny_lab.rglob("*.safetensors"))
    assert names == sorted(["classifier.safetensors", "sd1.safetensors", "sd1b.safetensors", "sdxl.safetensors",
                            "vae-sd1.safetensors", "vae-sdxl.safetensors",
                            *(f"lora/{k}-{m}.safetensors" for k in ("style", "concept") for m in minis.SPECS)])
    from lib_deltasampling.lab import train
    train.PRESETS["test"] = train.PRESETS["quick"]
    try:    # a second run finds every stage done and trains nothing
        train.main(["--out", str(tiny_lab), "--preset", "test", "--device", "cpu", "--workers", "1",
                    "--vocab", str(clip_vocab)])
    finally:
        del train.PRESETS["test"]
    out = capsys.readouterr().out
    assert out.count("done before, kept") == 3 and "step" not in out


def test_study_generation_matches_the_runner_and_the_delta_changes_the_image(tiny_lab: Path, clip_vocab):
    from lib_deltasampling.lab.generate import Lab, Transfer, generate
    lab = Lab(tiny_lab, vocab=str(clip_vocab))
    prompts, seeds = ["a red circle on sand"], [5]
    plain = generate(lab, "sdxl", prompts, seeds, steps=4)
    again = generate(lab, "sdxl", prompts, seeds, steps=4, transfer=Transfer("sd1", "style", scale=0.0))
    assert np.array_equal(plain, again)                        # scale 0: the delta is off
    out = tiny_lab / "runner.png"
    subprocess.run([sys.executable, "-m", "lib_deltasampling", "generate", "--target", str(lab.path("sdxl")),
                    "--source", str(lab.path("sd1")), "--width", "64", "--height", "64", "--steps", "4",
                    "--cfg", "5", "--seed", "5", "--sampler", "Euler", "--prompt", prompts[0], "--scale", "0",
                    "--vocab", str(clip_vocab), "--out", str(out), "--quiet", "--device", "cpu"],
                   check=True, cwd=ROOT, capture_output=True)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), plain[0])   # the same pixels as the runner's


def test_demo_writes_a_three_column_grid(tiny_lab: Path, clip_vocab, tmp_path: Path):
    out = tmp_path / "demo.png"
    run = subprocess.run([sys.executable, "-m", "lib_deltasampling", "demo", "--models", str(tiny_lab),
                          "--vocab", str(clip_vocab), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "style" in run.stdout and str(out) in run.stdout
    from PIL import Image
    w, h = Image.open(out).size
    assert w == 3 * 64 * 3 and h > 4 * 64 * 3
    again = subprocess.run([sys.executable, "-m", "lib_deltasampling", "demo", "--models", str(tiny_lab),
                            "--vocab", str(clip_vocab), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_demo_without_models_names_the_folder_and_the_fix(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "lib_deltasampling", "demo", "--models", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "lab.train --out" in run.stderr and "none" in run.stderr


def test_demo_on_the_shipped_models(tmp_path: Path, clip_vocab):
    """The shipped minis (lib_deltasampling/lab/minis) are complete, load, and the delta changes the image."""
    from lib_deltasampling.lab import DEFAULT_FOLDER
    from lib_deltasampling.lab.demo import NEEDED
    assert all((DEFAULT_FOLDER / n).is_file() for n in NEEDED)
    out = tmp_path / "demo.png"
    run = subprocess.run([sys.executable, "-m", "lib_deltasampling", "demo", "--vocab", str(clip_vocab), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    grid = np.asarray(Image.open(out).convert("RGB"))
    side = 64 * 3
    body = grid[grid.shape[0] - 4 * side:]
    target, delta = body[:, :side], body[:, side:2 * side]
    assert np.abs(target.astype(int) - delta).mean() > 1.0      # the delta is applied
