"""ProLoRA conversion (lib_deltasampling/bake): the projection against explicit projector
matrices written out here, the identity case, the similarity by hand, the re-factoring against the
Eckart-Young bound, and whole files: small checkpoints in the real single-file layouts, LoRAs from
the adapter tests' factory, the converted file loaded by the runtime's own adapter loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import factories
from lib_deltasampling.bake import prolora
from lib_deltasampling.bake.convert import ModelWeights, convert_lora
from lib_deltasampling.errors import ModelFileError, SettingError, UserError
from lib_deltasampling.runtime.adapters.algorithms import parse_layer
from lib_deltasampling.runtime.adapters.base import LayerSpec
from lib_deltasampling.runtime.adapters.keys import group_layers
from lib_deltasampling.runtime.checkpoint import open_store
from test_adapters import build_adapter, ref_delta

torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """The hash and SVD caches in this test's folder, never the user's."""
    monkeypatch.setenv("DELTA_SAMPLING_HASH_CACHE", str(tmp_path / "hashes.json"))
    monkeypatch.setenv("DELTA_SAMPLING_SVD_CACHE", str(tmp_path / "svd-default"))


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k]


def weight(out: int, in_: int, seed: int) -> torch.Tensor:
    return torch.randn(out, in_, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projectors(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_U [out, out], Q_V [in, in]) of the k leading singular vectors, as full matrices."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=True)
    return u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k]


def reference_projection(delta, w_s, w_t, k, *, kron: bool = False):
    """dW_t = P_t(dW_par) + (dW_perp - P_t(dW_perp)) with P(X) = P_U X Q_V, dW_par = P_s(dW),
    dW_perp = dW - dW_par, every projector formed as a full matrix; with `kron`, P acts on
    vec(X) as the Kronecker product Q_Vᵀ ⊗ P_U (small matrices only)."""
    d = delta.double().reshape(delta.shape[0], -1)
    ps, qs = projectors(w_s.reshape(w_s.shape[0], -1), k)
    pt, qt = projectors(w_t.reshape(w_t.shape[0], -1), k)
    if kron:
        kron_s, kron_t = torch.kron(qs.T.contiguous(), ps), torch.kron(qt.T.contiguous(), pt)   # column-major vec
        vec = d.T.reshape(-1)
        par = kron_s @ vec
        perp = vec - par
        moved = (kron_t @ par + (perp - kron_t @ perp)).reshape(d.shape[1], d.shape[0]).T
    else:
        par = ps @ d @ qs
        perp = d - par
        moved = pt @ par @ qt + (perp - pt @ perp @ qt)
    return moved.reshape(delta.shape)


@pytest.mark.parametrize("shape, k", [((6, 9), 3), ((9, 6), 2), ((8, 8), 5), ((6, 3, 3, 3), 4)])
def test_projection_equals_the_formula_with_explicit_projectors(shape, k):
    w_s = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    w_t = w_s + 0.5 * torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    got = prolora.project(delta, prolora.subspace(w_s, k), prolora.subspace(w_t, k))
    torch.testing.assert_close(got.double(), reference_projection(delta, w_s, w_t, k, kron=True), atol=1e-5, rtol=1e-5)
    assert got.shape == delta.shape


def test_split_parts_by_hand():
    # W = diag(3, 2, 1): with k = 1 the subspace is e1 on both sides
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    delta = torch.arange(1.0, 10.0).reshape(3, 3)
    par, perp = prolora.split(delta, prolora.subspace(w, 1))
    assert par.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert perp.tolist() == [[0, 2, 3], [4, 5, 6], [7, 8, 9]]     # everything else, the mixed terms too


@pytest.mark.parametrize("shape, k", [((12, 12), 12), ((12, 12), 5), ((20, 6), 6), ((6, 20), 2)])
def test_identity_target_gives_back_the_change(shape, k):
    """Target = source: the change comes back whole, for any subspace size and for layers whose
    sides differ (the two-sided form would lose (I - P_U) dW there: checked to be non-zero)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    delta = torch.randn(shape[0], 3, generator=torch.Generator().manual_seed(5)) @ \
        torch.randn(3, shape[1], generator=torch.Generator().manual_seed(6))     # a rank-3 LoRA change
    space = prolora.subspace(w, k)
    torch.testing.assert_close(prolora.project(delta, space, space), delta, atol=1e-4, rtol=1e-4)
    p, q = projectors(w.double(), k)
    eye_o, eye_i = torch.eye(shape[0], dtype=torch.float64), torch.eye(shape[1], dtype=torch.float64)
    two_sided = p @ delta.double() @ q + (eye_o - p) @ delta.double() @ (eye_i - q)
    if k < max(shape):      # a side with a null space the mixed terms reach
        assert float((two_sided - delta.double()).abs().max()) > 1e-2


def test_similarity_by_hand():
    e = torch.eye(4)
    a = prolora.Subspace(e[:, :1], e[:, :1])
    b = prolora.Subspace(((e[:, 0] + e[:, 1]) / 2 ** 0.5)[:, None], e[:, 1:2])
    assert prolora.similarity(a, a) == pytest.approx((1.0, 1.0))
    left, right = prolora.similarity(a, b)
    assert left == pytest.approx(0.5) and right == pytest.approx(0.0)
    u = orthonormal(64, 8, 7).float()
    v = orthonormal(64, 8, 8).float()
    left, _ = prolora.similarity(prolora.Subspace(u, u), prolora.Subspace(v, v))
    assert left < 0.5                                               # unrelated 8-dim subspaces of R^64: ~ 8/64


def test_low_rank_is_the_truncated_svd():
    delta = (weight(10, 4, 9) @ weight(4, 7, 10)).float()
    up, down = prolora.low_rank(delta, 4)
    torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=1e-4)         # exact at its own rank
    up, down = prolora.low_rank(delta, 2)
    s = torch.linalg.svdvals(delta.double())
    residual = float((up @ down - delta).double().norm() ** 2)
    assert residual == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-4)     # Eckart-Young
    conv = torch.randn(6, 3, 3, 3)
    up, down = prolora.low_rank(conv, 27)
    torch.testing.assert_close((up @ down).reshape(conv.shape), conv, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- whole files

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prolora")
    out = {}
    for family, seeds in (("sd1", (0, 1)), ("sdxl", (0, 1))):
        for seed in seeds:
            path = d / f"{family}-{seed}.safetensors"
            factories.write_checkpoint(path, family, seed=seed)
            out[f"{family}-{seed}"] = path
    return out


def write_lora(path: Path, family: str, base: Path, *, algorithm: str = "lora", seed: int = 0) -> Path:
    adapter, _ = build_adapter(family, "kohya", algorithm, _all(base), seed=seed)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(path))
    return path


def _all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def loaded_deltas(path: Path, model: ModelWeights) -> dict[str, torch.Tensor]:
    """{layer name: weight change} of a LoRA file as the runtime's parser reads it, on `model`."""
    store = open_store(path)
    groups, unknown = group_layers(store.keys())
    assert unknown == []
    out = {}
    for name, parts in groups.items():
        target = model.keymap.resolve(name)
        assert target is not None, name
        w = model.weight(target).float()
        layer = parse_layer({s: store.tensor(k).float() for s, k in parts.items()}, name, path)
        out[name] = layer.diff_weight(LayerSpec("conv" if w.ndim == 4 else "linear", w, None), 1.0)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_identity_conversion_gives_back_the_lora(family, models, tmp_path):
    base = models[f"{family}-0"]
    lora = write_lora(tmp_path / "in.safetensors", family, base)
    out = tmp_path / "out.safetensors"
    report = convert_lora(base, base, lora, out, subspace_rank=10_000, threshold=0.99)
    assert report.dropped == [] and len(report.transferred) == len(group_layers(open_store(lora).keys())[0])
    model = ModelWeights(base)
    before, after = loaded_deltas(lora, model), loaded_deltas(out, model)
    moved = {r.name: r.output_name for r in report.transferred}
    for name, delta in before.items():
        # fp16 storage of the factors; identity up to that rounding
        torch.testing.assert_close(after[moved[name]], delta, atol=2e-3, rtol=2e-2)
    assert all(n.startswith(("lora_unet_", "lora_te_" if family == "sd1" else "lora_te1_", "lora_te2_"))
               for n in after)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_conversion_onto_another_model_is_the_projection_in_the_targets_layout(family, models, tmp_path):
    source, target = models[f"{family}-0"], models[f"{family}-1"]
    lora = write_lora(tmp_path / "in.safetensors", family, source, seed=3)
    out = tmp_path / "out.safetensors"
    report = convert_lora(source, target, lora, out, subspace_rank=4, threshold=0.0, rank=64)
    assert report.dropped == []
    src, tgt = ModelWeights(source), ModelWeights(target)
    tensors = _all(lora)
    after = loaded_deltas(out, tgt)             # every key resolves on the target: its layout
    for result in report.transferred:
        target_weight = src.keymap.resolve(result.name)
        w_s, w_t = src.weight(target_weight), tgt.weight(target_weight)
        group = {k[len(result.name) + 1:]: v for k, v in tensors.items() if k.startswith(result.name + ".")}
        delta = ref_delta(group, tuple(w_s.shape))                  # from the format's definition
        want = reference_projection(delta, w_s, w_t, 4)
        torch.testing.assert_close(after[result.output_name].double(), want, atol=3e-3, rtol=3e-2)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ds_source"] == source.name and meta["ds_target"] == target.name and meta["ds_threshold"] == "0.0"
    assert "ProLoRA" in meta["ds_method"] and '"transferred": ' in meta["ds_summary"]


def test_threshold_drops_unlike_layers_and_says_why(models, tmp_path):
    source, target = models["sd1-0"], models["sd1-1"]
    lora = write_lora(tmp_path / "in.safetensors", "sd1", source)
    report = convert_lora(source, target, lora, None, subspace_rank=4, threshold=0.0)
    sims = sorted(min(r.similarity) for r in report.layers)
    middle = (sims[0] + sims[-1]) / 2
    assert sims[0] < middle < sims[-1]
    report = convert_lora(source, target, lora, None, subspace_rank=4, threshold=middle)
    assert report.transferred and report.dropped
    for r in report.dropped:
        assert min(r.similarity) < middle and f"below the threshold {middle:g}" in r.reason
    out = tmp_path / "none.safetensors"
    with pytest.raises(UserError, match="no layer of in.safetensors could be transferred"):
        convert_lora(source, target, lora, out, subspace_rank=4, threshold=1.0)
    assert not out.exists()


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_inputs_are_converted_through_their_weight_change(algorithm, models, tmp_path):
    base = models["sd1-0"]
    lora = write_lora(tmp_path / "in.safetensors", "sd1", base, algorithm=algorithm)
    out = tmp_path / "out.safetensors"
    report = convert_lora(base, base, lora, out, subspace_rank=10_000, threshold=0.99, rank=64)
    model = ModelWeights(base)
    before, after = loaded_deltas(lora, model), loaded_deltas(out, model)
    for r in report.transferred:
        torch.testing.assert_close(after[r.output_name], before[r.name], atol=3e-3, rtol=3e-2)


def test_bad_inputs_are_named(models, tmp_path):
    lora = write_lora(tmp_path / "in.safetensors", "sd1", models["sd1-0"])
    with pytest.raises(UserError, match=r"sdxl-0.safetensors: cannot take a LoRA converted from sd1-0.safetensors: the source is SD1.x and the target SDXL.*Use Delta Sampling instead"):
        convert_lora(models["sd1-0"], models["sdxl-0"], lora, tmp_path / "x.safetensors")
    xl_lora = write_lora(tmp_path / "xl.safetensors", "sdxl", models["sdxl-0"])
    with pytest.raises(ModelFileError, match=r"is an SDXL adapter and the source base sd1-0.safetensors is SD1.x"):
        convert_lora(models["sd1-0"], models["sd1-1"], xl_lora, tmp_path / "x.safetensors")
    # a target that lacks a weight the LoRA changes
    tensors = _all(models["sd1-1"])
    del tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(ModelFileError, match=r"broken.safetensors.*no weight for the LoRA's layer .*proj_in"):
        convert_lora(models["sd1-0"], broken, lora, tmp_path / "x.safetensors")
    with pytest.raises(SettingError, match="threshold"):
        convert_lora(models["sd1-0"], models["sd1-1"], lora, None, threshold=2.0)
    assert not (tmp_path / "x.safetensors").exists()


def test_subspaces_are_cached_per_model_and_layer(models, tmp_path):
    from lib_deltasampling.bake.cache import SubspaceCache

    source, target = models["sd1-0"], models["sd1-1"]
    lora = write_lora(tmp_path / "in.safetensors", "sd1", source)
    plain = convert_lora(source, target, lora, tmp_path / "plain.safetensors", subspace_rank=4, threshold=0)
    cache = SubspaceCache(tmp_path / "svd")
    convert_lora(source, target, lora, tmp_path / "first.safetensors", subspace_rank=4, threshold=0, cache=cache)
    layers = len(plain.layers)
    assert (cache.hits, cache.misses) == (0, 2 * layers)
    entries = sorted((tmp_path / "svd").rglob("*.safetensors"))
    assert len(entries) == 2 * layers and {p.parent.name for p in entries} == {"k4"}
    entries[0].write_bytes(b"damaged")                                   # recomputed and replaced
    again = SubspaceCache(tmp_path / "svd")
    convert_lora(source, target, lora, tmp_path / "again.safetensors", subspace_rank=4, threshold=0, cache=again)
    assert (again.hits, again.misses) == (2 * layers - 1, 1)
    for name in ("first", "again"):
        assert _all(tmp_path / f"{name}.safetensors").keys() == _all(tmp_path / "plain.safetensors").keys()
        for key, value in _all(tmp_path / f"{name}.safetensors").items():
            torch.testing.assert_close(value, _all(tmp_path / "plain.safetensors")[key], atol=1e-3, rtol=1e-3)


def test_command_line(models, tmp_path, capsys):
    from lib_deltasampling.__main__ import main
    from lib_deltasampling.runner import convert_cli

    assert (convert_cli.DEFAULT_THRESHOLD, convert_cli.DEFAULT_SUBSPACE_RANK) == \
        (prolora.DEFAULT_THRESHOLD, prolora.DEFAULT_SUBSPACE_RANK)
    lora = write_lora(tmp_path / "in.safetensors", "sd1", models["sd1-0"])
    out = tmp_path / "out.safetensors"
    args = ["convert", "--source-base", str(models["sd1-0"]), "--target", str(models["sd1-1"]), "--lora", str(lora),
            "--out", str(out), "--subspace-rank", "4", "--threshold", "0"]
    assert main(args) == 0
    captured = capsys.readouterr()
    layers = len(group_layers(open_store(lora).keys())[0])
    assert f"{layers} of {layers} layers transferred" in captured.out and "converting [" in captured.err
    assert f"SVD cache: 0 reused, {2 * layers} computed" in captured.out
    assert open_store(out).keys()
    assert main(args) == 2 and "exists. Add --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"SVD cache: {2 * layers} reused, 0 computed" in captured.out
    bad = ["convert", "--source-base", str(models["sd1-0"]), "--target", str(models["sdxl-0"]), "--lora", str(lora),
           "--out", str(tmp_path / "x.safetensors")]
    assert main(bad) == 2 and "Use Delta Sampling instead" in capsys.readouterr().err
    assert main(args[:-6] + ["--out", str(tmp_path / "x.ckpt")]) == 2
    assert "not a .safetensors file" in capsys.readouterr().err


def merged_checkpoint(checkpoint: Path, lora: Path, out: Path) -> Path:
    """`checkpoint` with `lora`'s changes added to its weights by hand (the format's definition,
    test_adapters.ref_delta), written as a new file: a reference that uses no hooks."""
    tensors = _all(checkpoint)
    model = ModelWeights(checkpoint)
    prefixes = {"unet": "model.diffusion_model.", "te1": "cond_stage_model.transformer."}
    store = open_store(lora)
    for name, parts in group_layers(store.keys())[0].items():
        target = model.keymap.resolve(name)
        key = prefixes[target.component] + f"{target.module}.{target.param}"
        group = {suffix: store.tensor(k) for suffix, k in parts.items()}
        tensors[key] = (tensors[key].double() + ref_delta(group, tuple(tensors[key].shape))).to(tensors[key].dtype)
    save_file(tensors, str(out))
    return out


def test_runner_grid_of_delta_sampling_converted_and_copied(tmp_path):
    from PIL import Image

    from lib_deltasampling.__main__ import main
    from vocab import clip_vocab_path

    (tmp_path / "lora").mkdir()
    source = factories.write_checkpoint(tmp_path / "source.safetensors", "sd1", seed=5)
    target = factories.write_checkpoint(tmp_path / "target.safetensors", "sd1", seed=6, vae=True)
    lora = write_lora(tmp_path / "lora" / "moxin.safetensors", "sd1", source)
    converted = tmp_path / "moxin-for-target.safetensors"
    convert_lora(source, target, lora, converted, subspace_rank=4, threshold=0)

    def generate(target_file: Path, out: Path, *extra: str) -> int:
        return main(["generate", "--target", str(target_file), "--source", str(source), "--lora-dir",
                     str(tmp_path / "lora"), "--vocab", str(clip_vocab_path()), "--device", "cpu", "--prompt",
                     "a fox", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--quiet",
                     "--adapters", "<lora:moxin:1>", "--scale", "2", "--out", str(out), *extra])

    assert generate(target, tmp_path / "fox.png", "--compare-converted", str(converted)) == 0
    grid = np.asarray(Image.open(tmp_path / "fox-converted.png"))
    ds_image = np.asarray(Image.open(tmp_path / "fox.png"))
    h, w = ds_image.shape[:2]                          # the tiny VAE's size
    assert grid.shape == (24 + h, 3 * w, 3)
    assert Image.open(tmp_path / "fox-converted.png").info["Delta comparison"] == \
        "Delta Sampling, moxin | converted: moxin-for-target | copied: moxin"
    assert np.array_equal(grid[24:, :w], ds_image)
    # the other columns: the target with each LoRA merged into its weights by hand, sampled alone
    for column, lora_file in ((1, converted), (2, lora)):
        merged = merged_checkpoint(target, lora_file, tmp_path / f"merged-{column}.safetensors")
        assert generate(merged, tmp_path / f"ref-{column}.png", "--compare") == 0
        reference = np.asarray(Image.open(tmp_path / f"ref-{column}-nodelta.png")).astype(int)
        tile = grid[24:, w * column:w * (column + 1)].astype(int)
        assert np.abs(tile - reference).max() <= 2, column
    assert not np.array_equal(grid[24:, w:2 * w], grid[24:, 2 * w:])       # conversion changed something
    # across architectures there is nothing to convert or copy
    xl = factories.write_checkpoint(tmp_path / "xl.safetensors", "sdxl", seed=1, vae=True)
    assert generate(xl, tmp_path / "x.png", "--compare-converted", str(converted)) == 2
