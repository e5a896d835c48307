"""The quality study: does the delta carry an adaptation across models, how strongly for which
settings, and at what cost to the target's content? One command writes its tables and grids:

    python -m lib_deltasampling.lab.study --out docs/quality --doc docs/QUALITY.md

Two pairs: cross-latent (SD1-layout source -> SDXL-layout target, different VAEs and latent scale
factors) and same-latent (SD1-layout -> another SD1-layout model sharing its VAE). For each:
the target alone, the oracle (the same LoRA trained on the target itself), Delta Sampling over
scale, schedule shape and window, source guidance, reuse and sampler, and the naive baseline
(source + LoRA first pass, then target img2img). Scores come from the world's classifier
(metrics.py): style recovery = (DS - target) / (oracle - target) of the style score; content
retention = content accuracy / the target's own.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world
from .generate import DEFAULT_FOLDER, Lab, Transfer, firstpass, generate
from .metrics import evaluate

PAIRS = {"cross": ("sd1", "sdxl"), "same": ("sd1", "sd1b")}
GOALS = {"cross": 0.70, "same": 0.85}    # style recovery of the oracle, with content kept >= 90 % (issue 14)
SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
SEEDS_PER_PROMPT = 3


@dataclass
class EvalSet:
    scenes: list[world.Scene]
    seeds: list[int]

    @property
    def prompts(self) -> list[str]:
        return [s.caption() for s in self.scenes]


def eval_sets(n_style: int = 16, n_concept: int = 8, seed: int = 12345) -> dict[str, EvalSet]:
    """Held-out prompts (a seed the training never used), each drawn with SEEDS_PER_PROMPT seeds."""
    rng = np.random.default_rng(seed)
    style = [world.random_scene(rng, pair_fraction=0.5) for _ in range(n_style)]
    concept = world.concept_scenes(rng, n_concept)

    def expand(scenes):
        rows = [s for s in scenes for _ in range(SEEDS_PER_PROMPT)]
        return EvalSet(rows, [1000 + i for i in range(len(rows))])
    return {"style": expand(style), "concept": expand(concept)}


class Study:
    def __init__(self, lab: Lab, out: Path, steps: int = 20, cfg: float = 5.0) -> None:
        self.lab, self.out, self.steps, self.cfg = lab, out, steps, cfg
        self.sets = eval_sets()
        self.rows: list[dict] = []
        self.images: dict[tuple, np.ndarray] = {}

    def run(self, pair: str, name: str, kind: str, *, transfer: Transfer | None = None, oracle: bool = False,
            sampler: str = "Euler", first_pass: float | None = None, **tags) -> dict:
        source, target = PAIRS[pair]
        data = self.sets[kind]
        t0 = time.perf_counter()
        if first_pass is not None:
            images = firstpass(self.lab, target, data.prompts, data.seeds, source=source, lora=kind,
                               strength=first_pass, steps=self.steps, cfg=self.cfg, sampler=sampler)
        else:
            images = generate(self.lab, target, data.prompts, data.seeds, steps=self.steps, cfg=self.cfg,
                              sampler=sampler, transfer=transfer, target_lora=kind if oracle else None)
        scores = evaluate(self.lab.classifier(), images, data.scenes)
        row = {"pair": pair, "name": name, "kind": kind, "sampler": sampler, **tags, **scores,
               "seconds": round(time.perf_counter() - t0, 2)}
        self.rows.append(row)
        self.images[(pair, name, kind, sampler)] = images
        print(f"{pair:5} {kind:7} {sampler:7} {name:28} style {scores['style']:.3f} concept {scores['concept']:.3f} "
              f"content {scores['content']:.3f} ({row['seconds']} s)", flush=True)
        return row

    def ds(self, pair: str, kind: str, sampler: str = "Euler", **settings) -> dict:
        source = PAIRS[pair][0]
        label = "DS " + " ".join(f"{k}={v}" for k, v in settings.items())
        return self.run(pair, label, kind, transfer=Transfer(source, kind, **settings), sampler=sampler, **settings)

    def pair_study(self, pair: str) -> dict:
        """Every axis for one pair; returns the chosen scale."""
        for kind in ("style", "concept"):
            self.run(pair, "target alone", kind)
            self.run(pair, "oracle LoRA", kind, oracle=True)
            for scale in SCALES:
                self.ds(pair, kind, scale=scale)
        best = self.best_scale(pair, "style")
        for shape in ("linear", "cosine", "sigmoid"):
            self.ds(pair, "style", scale=best, schedule=shape)
        for start, end in ((0.0, 0.5), (0.5, 1.0), (0.0, 0.75)):
            self.ds(pair, "style", scale=best, start=start, end=end)
        self.ds(pair, "style", scale=best, guidance="cond")
        for reuse in (2, 3):
            self.ds(pair, "style", scale=best, reuse=reuse)
        self.run(pair, "target alone", "style", sampler="Euler a")
        self.run(pair, "oracle LoRA", "style", oracle=True, sampler="Euler a")
        self.ds(pair, "style", sampler="Euler a", scale=best)
        for strength in (0.4, 0.6, 0.8):
            self.run(pair, f"first pass + img2img {strength}", "style", first_pass=strength, strength=strength)
        return {"best_scale": best}

    def lookup(self, pair: str, name: str, kind: str, sampler: str = "Euler") -> dict:
        return next(r for r in self.rows if (r["pair"], r["name"], r["kind"], r["sampler"]) == (pair, name, kind, sampler))

    def relative(self, row: dict) -> dict:
        """Recovery of the oracle's style (or concept) score, and content kept, against the same sampler's baselines."""
        base = self.lookup(row["pair"], "target alone", row["kind"], row["sampler"])
        oracle = self.lookup(row["pair"], "oracle LoRA", row["kind"], row["sampler"])
        score = row["kind"]
        gap = oracle[score] - base[score]
        return {"recovery": (row[score] - base[score]) / gap if abs(gap) > 1e-6 else float("nan"),
                "content_kept": row["content"] / base["content"] if base["content"] > 0 else float("nan")}

    def best_scale(self, pair: str, kind: str) -> float:
        """The scale with the highest recovery among those that keep >= 90 % of the target's content."""
        rows = [r for r in self.rows if r["pair"] == pair and r["kind"] == kind and "scale" in r
                and not any(k in r for k in ("schedule", "start", "end", "guidance", "reuse"))
                and r["sampler"] == "Euler"]
        ok = [r for r in rows if self.relative(r)["content_kept"] >= 0.9] or rows
        return max(ok, key=lambda r: self.relative(r)["recovery"])["scale"]

    # ------------------------------------------------------------------ outputs

    def grids(self, pair: str, best: float) -> list[str]:
        from ..runner.grid import labelled_grid
        from ..runner.png import write_png
        written = []

        def save(name: str, columns: list[np.ndarray], labels: list[str], rows: list[int]) -> None:
            cols = [np.repeat(np.repeat(c[rows], 2, axis=1), 2, axis=2) for c in columns]   # 2x: readable
            path = self.out / f"{name}.png"
            write_png(path, labelled_grid(cols, labels))
            written.append(path.name)

        pick = list(range(0, len(self.sets["style"].scenes), SEEDS_PER_PROMPT))[:6]   # 6 prompts, first seed each
        get = lambda n, k="style", s="Euler": self.images[(pair, n, k, s)]  # noqa: E731
        source_alone = generate(self.lab, PAIRS[pair][0], self.sets["style"].prompts, self.sets["style"].seeds,
                                steps=self.steps, cfg=self.cfg, target_lora="style")
        save(f"{pair}-style", [get("target alone"), get(f"DS scale={best}"), get("oracle LoRA"),
                               get("first pass + img2img 0.6"), source_alone],
             ["target", f"DS x{best:g}", "oracle", "1st pass", "source+LoRA"], pick)
        save(f"{pair}-scale", [get("target alone")] + [get(f"DS scale={s}") for s in SCALES] + [get("oracle LoRA")],
             ["target"] + [f"x{s:g}" for s in SCALES] + ["oracle"], pick[:4])
        best_c = self.best_scale(pair, "concept")
        save(f"{pair}-concept", [get("target alone", "concept"), get(f"DS scale={best_c}", "concept"),
                                 get("oracle LoRA", "concept")], ["target", f"DS x{best_c:g}", "oracle"],
             list(range(0, len(self.sets["concept"].scenes), SEEDS_PER_PROMPT))[:6])
        return written

    def goal_line(self, pair: str, best: float) -> str:
        row = self.lookup(pair, f"DS scale={best}", "style")
        rel = self.relative(row)
        met = rel["recovery"] >= GOALS[pair] and rel["content_kept"] >= 0.9
        return (f"**Goal ({pair}): recover >= {GOALS[pair]:.0%} of the oracle's style score with >= 90 % of the "
                f"target's content: {'met' if met else 'missed'}** at scale {best:g}: recovery "
                f"{rel['recovery']:.0%}, content kept {rel['content_kept']:.0%}.")

    def table(self, pair: str) -> list[str]:
        lines = ["| run | sampler | style | concept | content | recovery of oracle | content kept | s |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in self.rows if r["pair"] == pair):
            rel = self.relative(r)
            lines.append(f"| {r['kind']}: {r['name']} | {r['sampler']} | {r['style']:.3f} | {r['concept']:.3f} | "
                         f"{r['content']:.3f} | {rel['recovery']:.0%} | {rel['content_kept']:.0%} | {r['seconds']} |")
        return lines


def write_doc(doc: Path, section: list[str]) -> None:
    """Replace the text between the study's markers in `doc` (or append the section)."""
    begin, end = "<!-- study:begin -->", "<!-- study:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join([begin, *section, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lib_deltasampling.lab.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=DEFAULT_FOLDER)
    p.add_argument("--out", type=Path, default=Path("docs/quality"))
    p.add_argument("--doc", type=Path, default=Path("docs/QUALITY.md"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", default=None)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = p.parse_args(argv)
    import torch
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(Lab(args.models, args.device, args.vocab), args.out)
    started = time.time()
    section = [f"Written by `python -m lib_deltasampling.lab.study` on {time.strftime('%Y-%m-%d')} "
               f"({args.device}, torch {torch.__version__}); {len(study.sets['style'].scenes)} style images and "
               f"{len(study.sets['concept'].scenes)} concept images per run, {study.steps} steps, CFG {study.cfg}.", ""]
    summary = {}
    for pair in args.pairs:
        found = study.pair_study(pair)
        summary[pair] = found
        grids = study.grids(pair, found["best_scale"])
        source, target = PAIRS[pair]
        section += [f"### {pair}: {source} -> {target} (chosen scale {found['best_scale']:g})", "",
                    study.goal_line(pair, found["best_scale"]), "", *study.table(pair), "", *[f"![{g}](quality/{g})" for g in grids], ""]
    section.append(f"Study time: {time.time() - started:.0f} s.")
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "rows": study.rows}, indent=1) + "\n")
    write_doc(args.doc, section)
    print(f"wrote {args.doc} and {args.out}")


if __name__ == "__main__":
    main()
