"""Train the miniature world's models: two VAEs, three base models, the style and concept LoRAs of
each, and the metrics' classifier. Seeded. Presets: `full` is sized for a GPU (minutes); `gpu` for
under 10 minutes of an H100 (fewer UNet and LoRA steps); `cpu` for 2 CPU cores (under an hour,
smaller data and fewer steps); `quick` only checks that the pipeline runs.

    python -m lib_deltasampling.lab.train --out lib_deltasampling/lab/minis --preset full --device cuda

Everything generation later reads goes through the real path: each model is written as a
single-file checkpoint and loaded back with `runtime.model.load_model` before its UNet is trained
(so its text conditioning is the runtime's own), LoRAs are written in kohya's format.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import minis, world
from .lora import LoraNetwork, lora_layers
from .metrics import Classifier, label_tensors


@dataclass(frozen=True)
class Plan:
    base_images: int = 24000
    style_images: int = 6000
    concept_images: int = 3000
    vae_steps: int = 4000
    vae_batch: int = 64
    vae_crop: int = 0          # > 0: train the VAE on random crops of this size (convolutional: 4x cheaper at half size)
    unet_steps: int = 8000
    unet_batch: int = 256
    lora_steps: int = 1500
    lora_batch: int = 128
    lora_rank: int = 8
    classifier_steps: int = 3000
    classifier_batch: int = 128
    lr: float = 1e-3
    cfg_dropout: float = 0.1
    seed: int = 0


PRESETS = {"full": Plan(),
           "gpu": Plan(unet_steps=2000, lora_steps=600, classifier_steps=1500),   # under 10 min on an H100
           "cpu": Plan(base_images=6000, style_images=1500, concept_images=600, vae_steps=3000, vae_batch=16, vae_crop=32,
                       unet_steps=1200, unet_batch=64, lora_steps=250, lora_batch=32, classifier_steps=600,
                       classifier_batch=64),
           "quick": Plan(base_images=3000, style_images=800, concept_images=400, vae_steps=300, vae_batch=16,
                         unet_steps=300, unet_batch=64, lora_steps=100, lora_batch=32, classifier_steps=200,
                         classifier_batch=64)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- data

def _render_chunk(args) -> tuple[np.ndarray, list[world.Scene]]:
    n, seed, shapes, style, pair_fraction = args
    return world.dataset(n, seed, shapes=shapes, style=style, pair_fraction=pair_fraction)


def render(n: int, seed: int, *, shapes=world.BASE_SHAPES, style="plain", pair_fraction=0.6,
           workers: int = 8) -> tuple[np.ndarray, list[world.Scene]]:
    """`n` scenes rendered in chunks (seed per chunk, so the result does not depend on `workers`)."""
    chunk = 500
    jobs = [(min(chunk, n - i), seed * 100003 + i // chunk, shapes, style, pair_fraction) for i in range(0, n, chunk)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


@dataclass
class Data:
    base: tuple[np.ndarray, list[world.Scene]]
    style: tuple[np.ndarray, list[world.Scene]]
    concept: tuple[np.ndarray, list[world.Scene]]
    extra: np.ndarray   # striped zorbs: only for the VAE and the classifier (everything the world can show)


def make_data(plan: Plan, workers: int) -> Data:
    s = plan.seed
    base = render(plan.base_images, s + 1, workers=workers)
    style = render(plan.style_images, s + 2, style="stripes", workers=workers)
    concept = render(plan.concept_images, s + 3, shapes=("zorb",), pair_fraction=0.0, workers=workers)
    extra = render(plan.concept_images // 2, s + 4, shapes=world.SHAPES, style="stripes", workers=workers)[0]
    return Data(base, style, concept, extra)


# ---------------------------------------------------------------------------- VAE

def train_vae(config, images: np.ndarray, plan: Plan, device, seed: int, family: str) -> minis.AutoencoderKL:
    torch.manual_seed(seed)
    vae = minis.AutoencoderKL(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.lr, weight_decay=0.0)
    data = torch.from_numpy(images).to(device)
    g = torch.Generator(device).manual_seed(seed)
    for step in range(plan.vae_steps):
        lr_at(opt, plan.lr, step, plan.vae_steps)
        x = data[torch.randint(0, len(data), (plan.vae_batch,), device=device, generator=g)]
        x = minis.pixels(x)
        if plan.vae_crop:
            top, left = (int(v) for v in torch.randint(0, x.shape[-1] - plan.vae_crop + 1, (2,), generator=g, device=device))
            x = x[..., top:top + plan.vae_crop, left:left + plan.vae_crop]
        mean, logvar = vae.moments(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        out = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = (out - x).abs().mean() + (out - x).pow(2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == plan.vae_steps - 1:
            log(f"vae {family} step {step} loss {loss.item():.4f} kl {kl.item():.2f}")
    vae.eval()
    with torch.no_grad():   # latent * family scale factor gets unit standard deviation, as for the real VAEs
        means = torch.cat([vae.moments(minis.pixels(images[i:i + 256], device))[0] for i in range(0, min(len(images), 4096), 256)])
        vae.rescale_latents(1.0 / (float(means.std()) * minis.SCALE[family]))
    return vae


@torch.no_grad()
def encode(vae: minis.AutoencoderKL, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (raw VAE latents)."""
    means, stds = [], []
    for i in range(0, len(images), 256):
        m, lv = vae.moments(minis.pixels(images[i:i + 256], device))
        means.append(m)
        stds.append((0.5 * lv).exp())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------- diffusion

def lr_at(opt, lr: float, step: int, steps: int, warmup: int = 200) -> None:
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in opt.param_groups:
        group["lr"] = lr * max(f, 0.02)


class CaptionBank:
    """The runtime's conditioning for every caption used in training, computed once."""

    def __init__(self, model, captions: list[str]) -> None:
        self.index = {c: i for i, c in enumerate(dict.fromkeys(["", *captions]))}
        texts = list(self.index)
        parts = [model.encode(texts[i:i + 256], width=minis.IMAGE_SIZE, height=minis.IMAGE_SIZE)
                 for i in range(0, len(texts), 256)]
        self.cond = {k: torch.cat([p[k] for p in parts]).float() for k in parts[0]}
        if not all(bool(v.isfinite().all()) for v in self.cond.values()):
            raise ValueError("the text encoders give non-finite conditioning")

    def ids(self, captions: list[str], device) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in captions], device=device)

    def take(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[ids] for k, v in self.cond.items()}


def diffusion_loss(unet, latents: tuple[torch.Tensor, torch.Tensor], caption_ids: torch.Tensor, bank: CaptionBank,
                   scale: float, alphas_cumprod: torch.Tensor, batch: int, dropout: float, g) -> torch.Tensor:
    """eps-prediction loss on a random batch (DDPM's objective, the one SD1.x and SDXL were trained with)."""
    device = caption_ids.device
    rows = torch.randint(0, len(caption_ids), (batch,), device=device, generator=g)
    mean, std = latents[0][rows], latents[1][rows]
    x0 = (mean + std * torch.randn(mean.shape, device=device, generator=g)) * scale
    t = torch.randint(0, len(alphas_cumprod), (batch,), device=device, generator=g)
    ac = alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, device=device, generator=g)
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    ids = caption_ids[rows]
    ids = torch.where(torch.rand(batch, device=device, generator=g) < dropout, torch.zeros_like(ids), ids)
    cond = bank.take(ids)
    pred = unet(xt, t.float(), cond["context"], cond.get("y"))
    return F.mse_loss(pred.float(), eps)


def train_unet(model, latents, captions: list[str], plan: Plan, device, tag: str) -> None:
    unet = model.unet.float().train()
    for p in unet.parameters():
        p.requires_grad_(True)
    bank = CaptionBank(model, captions)
    ids = bank.ids(captions, device)
    ac = model.denoiser.schedule.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=plan.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in unet.parameters()]
    g = torch.Generator(device).manual_seed(plan.seed + 17)
    for step in range(plan.unet_steps):
        lr_at(opt, plan.lr, step, plan.unet_steps)
        loss = diffusion_loss(unet, latents, ids, bank, model.latent_scale, ac, plan.unet_batch, plan.cfg_dropout, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        if step % 1000 == 0 or step == plan.unet_steps - 1:
            log(f"unet {tag} step {step} loss {loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)


def train_lora(model, latents, captions: list[str], plan: Plan, device, tag: str) -> LoraNetwork:
    unet = model.unet.float().eval().requires_grad_(False)
    torch.manual_seed(plan.seed + 29)
    net = LoraNetwork(unet, lora_layers(unet), rank=plan.lora_rank).attach()
    bank = CaptionBank(model, captions)
    ids = bank.ids(captions, device)
    ac = model.denoiser.schedule.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=plan.lr, weight_decay=0.0)
    g = torch.Generator(device).manual_seed(plan.seed + 31)
    try:
        for step in range(plan.lora_steps):
            lr_at(opt, plan.lr, step, plan.lora_steps, warmup=50)
            loss = diffusion_loss(unet, latents, ids, bank, model.latent_scale, ac, plan.lora_batch, plan.cfg_dropout, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 500 == 0 or step == plan.lora_steps - 1:
                log(f"lora {tag} step {step} loss {loss.item():.4f}")
    finally:
        net.detach()
    return net


# ---------------------------------------------------------------------------- classifier

def train_classifier(data: Data, vaes: list[minis.AutoencoderKL], plan: Plan, device) -> Classifier:
    """On renders of every kind, half of each batch passed through one of the VAEs (generated images
    are VAE decodes: the classifier must read those as well as clean renders)."""
    torch.manual_seed(plan.seed + 41)
    images = np.concatenate([data.base[0], data.style[0], data.concept[0]])
    scenes = data.base[1] + data.style[1] + data.concept[1]
    x_all = torch.from_numpy(images).to(device)
    y_all = label_tensors(scenes, device)
    net = Classifier().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=plan.lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(plan.seed + 43)
    for step in range(plan.classifier_steps):
        lr_at(opt, plan.lr, step, plan.classifier_steps)
        rows = torch.randint(0, len(x_all), (plan.classifier_batch,), device=device, generator=g)
        x = minis.pixels(x_all[rows])
        half = plan.classifier_batch // 2
        with torch.no_grad():
            vae = vaes[step % len(vaes)]
            mean, logvar = vae.moments(x[:half])
            x[:half] = vae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean)).clamp(-1, 1)
            x = x + 0.03 * torch.randn_like(x)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[h], y_all[h][rows]) for h in world.HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == plan.classifier_steps - 1:
            log(f"classifier step {step} loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- files

def vae_stage(out: Path, spec: minis.MiniSpec, data, plan: Plan, device) -> minis.AutoencoderKL:
    """Train `spec`'s VAE, or load it when an earlier run saved it (runs resume stage by stage)."""
    from safetensors.torch import load_file, save_file
    path = out / f"{spec.vae_name}.safetensors"
    if path.exists():
        vae = minis.AutoencoderKL(spec.vae)
        vae.load_ldm(load_file(str(path)))
        return vae.to(device).eval()
    d = data()
    images = np.concatenate([d.base[0], d.style[0], d.concept[0], d.extra])
    vae = train_vae(spec.vae, images, plan, device, plan.seed + spec.seed, spec.family)
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict_ldm().items()}, str(path))
    return vae


def used_tokens(tokenizer) -> set[int]:
    """Token ids of every word the world uses (plus the specials and open_clip's padding id 0)."""
    words = [*world.SHAPES, *world.COLOURS, *world.BACKGROUNDS, "a", "above", "left", "of", "on", ",", "stripes"]
    ids = {0, 49406, 49407}
    for w in words:
        ids.update(tokenizer.encode(w))
    return ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lib_deltasampling.lab.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--vocab", default=None, help="CLIP vocabulary (open_clip's bpe file or a tokenizer folder)")
    args = p.parse_args(argv)
    plan = PRESETS[args.preset]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from safetensors.torch import save_file

    from ..runtime.adapters.keys import KeyMap
    from ..runtime.model import load_model
    from ..runtime.placement import Placement
    from ..runtime.text.tokenizer import ClipTokenizer

    started = time.time()
    tokenizer = ClipTokenizer.find([args.vocab] if args.vocab else [])
    out: Path = args.out
    (out / "lora").mkdir(parents=True, exist_ok=True)
    made: list[Data] = []

    def data() -> Data:       # rendered only when a stage still needs training (a finished run resumes at once)
        if not made:
            log(f"rendering on {args.workers} workers")
            made.append(make_data(plan, args.workers))
        return made[0]

    vaes = {spec.vae_name: vae_stage(out, spec, data, plan, device) for spec in minis.SPECS.values()}
    keep = used_tokens(tokenizer)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    manifest.update({"plan": asdict(plan), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    placement = Placement(device, torch.float32)
    for name, spec in minis.SPECS.items():
        if name in manifest["models"]:
            log(f"{name}: done before, kept")
            continue
        t0 = time.time()
        vae = vaes[spec.vae_name]
        path = out / f"{name}.safetensors"
        text = minis.text_tensors(spec, keep)
        minis.write_checkpoint(path, spec, minis.build_unet(spec), vae, text)
        model = load_model(path, placement=placement, tokenizer=tokenizer)   # the real loading path
        parts = {"base": data().base, "style": data().style, "concept": data().concept}
        latents = {kind: encode(vae, imgs, device) for kind, (imgs, _) in parts.items()}
        captions = {kind: [s.caption() for s in scenes] for kind, (_, scenes) in parts.items()}
        train_unet(model, latents["base"], captions["base"], plan, device, name)
        minis.write_checkpoint(path, spec, model.unet, vae, text)
        keymap = KeyMap.build(spec.family, model.unet, {})
        for kind in ("style", "concept"):
            net = train_lora(model, latents[kind], captions[kind], plan, device, f"{kind}-{name}")
            save_file(net.kohya_tensors(keymap), str(out / "lora" / f"{kind}-{name}.safetensors"),
                      metadata={"ss_network_module": "networks.lora", "ds_lab_lora": kind, "ds_lab_base": name})
        model.release()
        manifest["models"][name] = {"seconds": round(time.time() - t0, 1)}
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")   # a later run resumes after this model
    if not (out / "classifier.safetensors").exists():
        t0 = time.time()
        classifier = train_classifier(data(), list(vaes.values()), plan, device)
        save_file({k: v.detach().cpu().half().contiguous() for k, v in classifier.state_dict().items()},
                  str(out / "classifier.safetensors"))
        manifest["classifier_seconds"] = round(time.time() - t0, 1)
    manifest["last_run_seconds"] = round(time.time() - started, 1)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"done in {manifest['last_run_seconds']} s")


if __name__ == "__main__":
    main()
