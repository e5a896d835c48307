"""The miniature world: procedural images of coloured shapes on backgrounds, with captions from a
small grammar and the labels the metrics check. No downloads; numpy only.

    single:  "a red circle on sand"
    pair:    "a red circle above a blue square, on sand"   /  "... left of ..."

Two adaptations live in this world, the way LoRAs do in the real one:
- STYLE "stripes": every object is filled with diagonal stripes (its colour and white) and drawn with a
  black outline. The colours stay, so content is still readable; no trigger word.
- CONCEPT "zorb": a new object (a plus-shaped cross) that the base models never saw, named by its
  trigger word, as in "a red zorb on sand".
Base models are trained on plain images of circles, squares and triangles only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "zorb")   # zorb: the concept, never in base training
BASE_SHAPES = SHAPES[:3]
COLOURS = {"red": (220, 50, 50), "green": (40, 160, 70), "blue": (50, 90, 225), "yellow": (240, 205, 40)}
BACKGROUNDS = {"sand": (226, 203, 152), "sky": (160, 200, 240), "night": (35, 35, 70), "snow": (246, 246, 246)}
LAYOUTS = ("single", "above", "left")
STYLES = ("plain", "stripes")
CONCEPT_WORD = "zorb"


@dataclass(frozen=True)
class Scene:
    """What one image shows; `caption()` is its prompt. `objects` holds (shape, colour) pairs:
    one for "single", two for "above"/"left" (the first is above / left of the second)."""

    layout: str
    objects: tuple[tuple[str, str], ...]
    background: str
    style: str = "plain"

    def caption(self) -> str:
        (s1, c1), *rest = self.objects
        if self.layout == "single":
            return f"a {c1} {s1} on {self.background}"
        (s2, c2), = rest
        relation = "above" if self.layout == "above" else "left of"
        return f"a {c1} {s1} {relation} a {c2} {s2}, on {self.background}"

    def labels(self) -> dict[str, int]:
        """Class indices per classifier head (`HEADS`); a single object's second slot is "none" (0)."""
        (s1, c1), *rest = self.objects
        s2, c2 = rest[0] if rest else (None, None)
        return {"layout": LAYOUTS.index(self.layout), "shape1": SHAPES.index(s1), "colour1": list(COLOURS).index(c1),
                "shape2": 0 if s2 is None else 1 + SHAPES.index(s2),
                "colour2": 0 if c2 is None else 1 + list(COLOURS).index(c2),
                "background": list(BACKGROUNDS).index(self.background), "style": STYLES.index(self.style)}


# Classifier heads and their class counts (metrics.py); shape2/colour2 have "none" as class 0.
HEADS = {"layout": len(LAYOUTS), "shape1": len(SHAPES), "colour1": len(COLOURS), "shape2": len(SHAPES) + 1,
         "colour2": len(COLOURS) + 1, "background": len(BACKGROUNDS), "style": len(STYLES)}
CONTENT_HEADS = ("layout", "shape1", "colour1", "shape2", "colour2", "background")


def random_scene(rng: np.random.Generator, *, shapes: tuple[str, ...] = BASE_SHAPES, style: str = "plain",
                 pair_fraction: float = 0.5) -> Scene:
    def obj() -> tuple[str, str]:
        return str(rng.choice(shapes)), str(rng.choice(list(COLOURS)))
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() >= pair_fraction:
        return Scene("single", (obj(),), background, style)
    return Scene(str(rng.choice(LAYOUTS[1:])), (obj(), obj()), background, style)


@dataclass
class Placement:
    """Where objects go, in units of the image side: centre (x, y) and radius, jittered per image."""
    centres: list[tuple[float, float]] = field(default_factory=list)
    radius: float = 0.3


def place(scene: Scene, rng: np.random.Generator) -> Placement:
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731  (a jitter)
    if scene.layout == "single":
        return Placement([(0.5 + j(0.08), 0.5 + j(0.08))], float(rng.uniform(0.26, 0.34)))
    a, b = 0.27 + j(0.03), 0.73 + j(0.03)
    c = 0.5 + j(0.06)
    centres = [(c, a), (c, b)] if scene.layout == "above" else [(a, c), (b, c)]
    return Placement(centres, float(rng.uniform(0.17, 0.21)))


def _mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up; base at cy + 0.8 r
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx) * (1.8 * r) / (2 * r))
    if shape == "zorb":      # a plus-shaped cross
        arm = 0.34 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None, *, supersample: int = 4) -> np.ndarray:
    """The image of `scene`, uint8 [size, size, 3]. `rng` jitters placement and background tone."""
    rng = rng if rng is not None else np.random.default_rng(0)
    placement = place(scene, rng)
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    tone = float(rng.uniform(0.93, 1.05))
    img = np.empty((n, n, 3), np.float32)
    img[:] = np.clip(np.array(BACKGROUNDS[scene.background], np.float32) * tone, 0, 255)
    for (shape, colour), (cx, cy) in zip(scene.objects, placement.centres):
        r = placement.radius
        inside = _mask(shape, x, y, cx, cy, r)
        fill = np.array(COLOURS[colour], np.float32)
        if scene.style == "stripes":
            period = 6.0 / size                       # 6 px stripes at any size
            light = ((x + y) / period) % 1.0 < 0.5
            img[inside] = np.where(light[inside, None], 255.0, fill)
            outline = inside & ~_mask(shape, x, y, cx, cy, r - 2.0 / size)
            img[outline] = 0.0
        else:
            img[inside] = fill
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def dataset(n: int, seed: int, *, size: int = 64, shapes: tuple[str, ...] = BASE_SHAPES, style: str = "plain",
            pair_fraction: float = 0.5) -> tuple[np.ndarray, list[Scene]]:
    """`n` rendered scenes: images uint8 [n, size, size, 3] and their scenes (captions, labels)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, shapes=shapes, style=style, pair_fraction=pair_fraction) for _ in range(n)]
    images = np.stack([render(s, size, rng) for s in scenes])
    return images, scenes


def concept_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """Scenes for the concept adaptation: a single zorb of any colour on any background."""
    return [Scene("single", (("zorb", str(rng.choice(list(COLOURS)))),), str(rng.choice(list(BACKGROUNDS))))
            for _ in range(n)]
