"""Adapter algorithms (LoRA/LoCon, LoHa, LoKr, DoRA, full, norm) against independent references.

References: each format's definition, written here without the runtime's helpers (A1111 v1.10.1
extensions-builtin/Lora network_*.py semantics: dW * alpha/rank * multiplier, DoRA's multiplier
after the decomposition), and LyCORIS's own `lycoris.functional` (lycoris-lora 4.1.3) for the
rebuilt weights. Bypass outputs are checked against the base op run with the merged weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import factory_adapters as fa
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.adapters.algorithms import parse_layer
from lib_deltasampling.runtime.adapters.base import LayerSpec

OUT, IN, RANK = 12, 10, 4
MULT = 0.7


# --- the references -------------------------------------------------------------------------

def alpha_scale(g: dict, rank: int | None) -> float:
    """A1111 calc_scale: alpha / rank when both exist, else 1."""
    if "alpha" in g and rank:
        return float(g["alpha"]) / rank
    return 1.0


def per_tap(shape: torch.Size, tap: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """A conv weight assembled kernel position by kernel position (a 2-D weight if shape is 2-D)."""
    if len(shape) == 2:
        return tap(None, None)
    w = torch.empty(shape)
    for h in range(shape[2]):
        for v in range(shape[3]):
            w[:, :, h, v] = tap(h, v)
    return w


def ref_lora(g: dict, shape: torch.Size) -> torch.Tensor:
    up, down = g["lora_up.weight"], g["lora_down.weight"]
    rank = down.shape[0]
    up2, down2 = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
    if "lora_mid.weight" in g:       # 1x1 down, kxk mid, 1x1 up: per tap up @ mid[:, :, h, w] @ down
        mid = g["lora_mid.weight"]
        dw = per_tap(shape, lambda h, v: up2 @ mid[:, :, h, v] @ down2)
    else:
        dw = (up2 @ down2).reshape(shape)
    return dw * alpha_scale(g, rank)


def ref_loha(g: dict, shape: torch.Size) -> torch.Tensor:
    def half(n: str) -> torch.Tensor:
        a, b = g[f"hada_w{n}_a"], g[f"hada_w{n}_b"]
        if f"hada_t{n}" in g:        # half[p, q] = sum_ij a[i, p] t[i, j] b[j, q], per tap
            t = g[f"hada_t{n}"]
            return per_tap(shape, lambda h, v: a.T @ t[:, :, h, v] @ b)
        return (a @ b.reshape(b.shape[0], -1)).reshape(shape)
    return half("1") * half("2") * alpha_scale(g, g["hada_w1_b"].shape[0])


def ref_lokr(g: dict, shape: torch.Size) -> torch.Tensor:
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        a, b, t = g["lokr_w2_a"], g["lokr_w2_b"], g["lokr_t2"]
        w2 = torch.stack([torch.stack([a.T @ t[:, :, h, v] @ b for v in range(t.shape[3])], -1)
                          for h in range(t.shape[2])], -2)
    else:
        w2b = g["lokr_w2_b"]
        w2 = g["lokr_w2_a"] @ w2b.reshape(w2b.shape[0], -1)
    if len(shape) == 4:              # kron per tap: W[:, :, h, w] = kron(w1, w2[:, :, h, w])
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        dw = per_tap(shape, lambda h, v: torch.kron(w1, w2[:, :, h, v]))
    else:
        dw = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    factor_b = g.get("lokr_w2_b", g.get("lokr_w1_b"))      # A1111: dim from w2_b, else w1_b, else none
    return dw * alpha_scale(g, None if factor_b is None else factor_b.shape[0])


def ref_full(g: dict, shape: torch.Size) -> torch.Tensor:
    return g["diff"].reshape(shape)


def ref_norm(g: dict, shape: torch.Size) -> torch.Tensor:
    return g["w_norm"]


def ref_dora(g: dict, w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """DoRA's definition: W'' = m * W' / ||W'||, W' = W + dW; the norm per output row when the
    magnitude is [out, 1, ...], per input column (over out and the kernel) when [1, in, ...]."""
    m = g["dora_scale"]
    merged = w + dw
    others = [d for d in range(w.dim()) if d != (0 if m.shape[0] == w.shape[0] else 1)]
    norm = torch.linalg.vector_norm(merged, dim=others, keepdim=True)
    return m.reshape(norm.shape) * merged / norm - w


REFERENCES = {"lora": ref_lora, "locon": ref_lora, "loha": ref_loha, "lokr": ref_lokr, "full": ref_full,
              "norm": ref_norm}


def reference_diff(case: "Case", multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    g, w = case.group, case.base.weight
    dw = REFERENCES[case.family](g, w.shape)
    if "dora_scale" in g:
        dw = ref_dora(g, w, dw)
    db = g.get("diff_b", g.get("b_norm"))
    return dw * multiplier, None if db is None else db * multiplier


def merged_forward(case: "Case", x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The base layer's op with weight + dW and bias + db (the reference merge)."""
    b = case.base
    dw, db = reference_diff(case, multiplier)
    weight = b.weight + dw
    bias = b.bias if db is None else b.bias + db
    return base_forward(b, x, weight, bias)


def base_forward(b: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if b.kind == "linear":
        return F.linear(x, weight, bias)
    if b.kind == "conv":
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)
    if b.norm_groups is None:
        return F.layer_norm(x, tuple(weight.shape), weight, bias, b.norm_eps)
    return F.group_norm(x, b.norm_groups, weight, bias, b.norm_eps)


# --- the cases --------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    family: str                      # which reference
    base: LayerSpec
    group: dict
    x_shape: tuple[int, ...]
    rank: int | None = None
    extra: dict = field(default_factory=dict)

    def x(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.x_shape, generator=torch.Generator().manual_seed(seed))


def linear_base(out=OUT, in_=IN, seed=0) -> LayerSpec:
    gen = torch.Generator().manual_seed(100 + seed)
    return LayerSpec("linear", torch.randn(out, in_, generator=gen) / math.sqrt(in_),
                     0.1 * torch.randn(out, generator=gen))


def conv_base(kernel=(3, 3), stride=(2, 2), padding=(1, 1), out=OUT, in_=IN, seed=0) -> LayerSpec:
    gen = torch.Generator().manual_seed(200 + seed)
    w = torch.randn(out, in_, *kernel, generator=gen) / math.sqrt(in_ * math.prod(kernel))
    return LayerSpec("conv", w, 0.1 * torch.randn(out, generator=gen), stride=stride, padding=padding)


def norm_base(channels=OUT, groups=None, seed=0) -> LayerSpec:
    gen = torch.Generator().manual_seed(300 + seed)
    return LayerSpec("norm", 1 + 0.1 * torch.randn(channels, generator=gen), 0.1 * torch.randn(channels, generator=gen),
                     norm_eps=1e-6 if groups is None else 1e-5, norm_groups=groups)


LIN_X = (2, 5, IN)          # [batch, tokens, features]
CONV_X = (2, IN, 9, 9)      # 9x9 with stride 2, padding 1 -> 5x5
CONV1_X = (2, IN, 6, 6)


def make_cases() -> list[Case]:
    c3, c1, lin = conv_base, lambda: conv_base((1, 1), (1, 1), (0, 0)), linear_base
    cases = [
        Case("lora-linear", "lora", lin(), fa.lora_group(OUT, IN, RANK), LIN_X, RANK),
        Case("lora-linear-no-alpha", "lora", lin(), fa.lora_group(OUT, IN, RANK, with_alpha=False), LIN_X, RANK),
        Case("lora-conv1x1", "lora", c1(), fa.lora_group(OUT, IN, RANK, kernel=(1, 1)), CONV1_X, RANK),
        Case("lora-2d-on-conv1x1", "lora", c1(), fa.lora_group(OUT, IN, RANK), CONV1_X, RANK),
        Case("lora-4d-on-linear", "lora", lin(), fa.lora_group(OUT, IN, RANK, kernel=(1, 1)), LIN_X, RANK),
        Case("locon-3x3-stride2", "locon", c3(), fa.lora_group(OUT, IN, RANK, kernel=(3, 3)), CONV_X, RANK),
        Case("locon-tucker-mid", "locon", c3(), fa.lora_group(OUT, IN, RANK, kernel=(3, 3), mid=True), CONV_X, RANK),
        Case("dora-linear-out", "lora", lin(), fa.lora_group(OUT, IN, RANK, dora="out"), LIN_X, RANK),
        Case("dora-linear-in", "lora", lin(), fa.lora_group(OUT, IN, RANK, dora="in"), LIN_X, RANK),
        Case("dora-conv-out", "locon", c3(), fa.lora_group(OUT, IN, RANK, kernel=(3, 3), dora="out"), CONV_X, RANK),
        Case("dora-conv-in", "locon", c3(), fa.lora_group(OUT, IN, RANK, kernel=(3, 3), dora="in"), CONV_X, RANK),
        Case("dora-tucker-in", "locon", c3(), fa.lora_group(OUT, IN, RANK, kernel=(3, 3), mid=True, dora="in"),
             CONV_X, RANK),
        Case("dora-conv1x1-no-bias", "lora", LayerSpec("conv", c1().weight, None),
             fa.lora_group(OUT, IN, RANK, kernel=(1, 1), dora="out"), CONV1_X, RANK),
        Case("loha-linear", "loha", lin(), fa.loha_group(OUT, IN, 3), LIN_X, 3),
        Case("loha-conv3x3", "loha", c3(), fa.loha_group(OUT, IN, 3, kernel=(3, 3)), CONV_X, 3),
        Case("loha-tucker", "loha", c3(), fa.loha_group(OUT, IN, 3, kernel=(3, 3), tucker=True), CONV_X, 3),
        Case("loha-dora-in", "loha", lin(), fa.loha_group(OUT, IN, 3, dora="in"), LIN_X, 3),
        Case("full-linear", "full", lin(), fa.full_group(OUT, IN), LIN_X),
        Case("full-conv3x3", "full", c3(), fa.full_group(OUT, IN, kernel=(3, 3)), CONV_X),
        Case("full-no-bias-dora", "full", lin(), fa.full_group(OUT, IN, bias=False, dora="out"), LIN_X),
        Case("full-on-layernorm", "full", norm_base(), {"diff": fa.norm_group(OUT)["w_norm"],
                                                        "diff_b": fa.norm_group(OUT, seed=1)["b_norm"]}, (2, 5, OUT)),
        Case("norm-layernorm", "norm", norm_base(), fa.norm_group(OUT), (2, 5, OUT)),
        Case("norm-layernorm-no-bias", "norm", norm_base(), fa.norm_group(OUT, bias=False), (2, 5, OUT)),
        Case("norm-groupnorm", "norm", norm_base(groups=4), fa.norm_group(OUT), (2, OUT, 4, 4)),
    ]
    for w1 in ("full", "factors"):
        for w2 in ("full", "factors"):
            rank = RANK if "factors" in (w1, w2) else None
            cases.append(Case(f"lokr-linear-w1{w1}-w2{w2}", "lokr", lin(),
                              fa.lokr_group(OUT, IN, RANK, w1=w1, w2=w2), LIN_X, rank))
        for w2, opts in (("full", {}), ("factors", {}), ("factors", {"w2b_4d": True}), ("tucker", {})):
            tag = w2 + ("-4d" if opts else "")
            cases.append(Case(f"lokr-conv-w1{w1}-w2{tag}", "lokr", c3(),
                              fa.lokr_group(OUT, IN, RANK, kernel=(3, 3), w1=w1, w2=w2, **opts), CONV_X,
                              RANK if "factors" in (w1, w2) or w2 == "tucker" else None))
    cases.append(Case("lokr-conv-dora-out", "lokr", c3(), fa.lokr_group(OUT, IN, RANK, kernel=(3, 3), dora="out"),
                      CONV_X, RANK))
    cases.append(Case("lokr-ranks-differ-w2b-rank-wins", "lokr", lin(),
                      fa.lokr_group(OUT, IN, RANK, w1="factors", w1_rank=2), LIN_X, RANK))
    cases.append(Case("lokr-full-full-alpha-ignored", "lokr", lin(),
                      fa.lokr_group(OUT, IN, RANK, w1="full", w2="full") | {"alpha": torch.tensor(3.0)}, LIN_X))
    return cases


CASES = make_cases()
IDS = [c.name for c in CASES]


def parsed(case: Case):
    layer = parse_layer(case.group, f"test.{case.name}", "adapter.safetensors")
    assert layer.check(case.base) is None
    return layer


# --- (1) diff_weight against the definitions --------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_diff_weight_matches_definition(case: Case):
    layer = parsed(case)
    assert layer.rank == case.rank
    assert layer.dora == ("dora_scale" in case.group)
    dw, db = reference_diff(case, MULT)
    got = layer.diff_weight(case.base, MULT)
    assert got.shape == case.base.weight.shape and got.dtype == case.base.weight.dtype
    torch.testing.assert_close(got, dw, atol=1e-6, rtol=1e-5)
    got_b = layer.diff_bias(case.base, MULT)
    assert (got_b is None) == (db is None)
    if db is not None:
        torch.testing.assert_close(got_b, db, atol=1e-7, rtol=1e-6)
    assert layer.nbytes() == sum(t.numel() * t.element_size() for k, t in case.group.items() if k != "alpha")


def test_algorithm_names():
    names = {c.name: parsed(c).algorithm for c in CASES}
    assert names["lora-linear"] == "lora" and names["lora-conv1x1"] == "lora"
    assert names["locon-3x3-stride2"] == "locon" and names["locon-tucker-mid"] == "locon"
    assert names["loha-tucker"] == "loha" and names["lokr-linear-w1full-w2full"] == "lokr"
    assert names["full-linear"] == "full" and names["norm-groupnorm"] == "norm"


# --- (1b) the same against LyCORIS' functional module -----------------------------------------

@pytest.fixture(scope="module")
def lycoris():
    import lycoris.functional as functional       # test-only reference (tests/requirements.txt)
    return functional


def lycoris_diff(fn, case: Case) -> torch.Tensor:
    """LyCORIS's rebuild of scale * dW for the case."""
    g, shape = case.group, case.base.weight.shape
    if case.family in ("lora", "locon"):
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        dw = fn.locon.diff_weight(down, up, g.get("lora_mid.weight"), gamma=alpha_scale(g, down.shape[0]))
    elif case.family == "loha":
        dw = fn.loha.diff_weight(g["hada_w1_b"], g["hada_w1_a"], g["hada_w2_b"], g["hada_w2_a"],
                                 g.get("hada_t1"), g.get("hada_t2"), gamma=alpha_scale(g, g["hada_w1_b"].shape[0]))
    elif case.family == "lokr":
        # kron_weight takes the scale as given; the alpha/rank rule is A1111's (checked above)
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        parts = [g.get(k) for k in names]
        factor_b = g.get("lokr_w2_b", g.get("lokr_w1_b"))
        dw = fn.lokr.kron_weight(*parts, scale=alpha_scale(g, None if factor_b is None else factor_b.shape[0]))
    else:
        raise ValueError(case.family)
    return dw.reshape(shape)


@pytest.mark.parametrize("case", [c for c in CASES if c.family in ("lora", "locon", "loha", "lokr")],
                         ids=[c.name for c in CASES if c.family in ("lora", "locon", "loha", "lokr")])
def test_diff_weight_matches_lycoris(case: Case, lycoris):
    ref = lycoris_diff(lycoris, case)
    w = case.base.weight
    if "dora_scale" in case.group:   # LyCORIS's DoRA epilogue on the merged weight (multiplier 1 agrees with A1111)
        wd_on_out = case.group["dora_scale"].shape[0] == w.shape[0]
        ref = lycoris.weight_decompose(w + ref, case.group["dora_scale"], 1.0, wd_on_out=wd_on_out) - w
    torch.testing.assert_close(parsed(case).diff_weight(case.base, 1.0), ref, atol=1e-5, rtol=1e-4)


# --- (2) bypass == the base op with the merged weight -------------------------------------------

@pytest.mark.parametrize("multiplier", [MULT, -1.3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bypass_matches_merged_op(case: Case, multiplier: float):
    layer, x = parsed(case), case.x()
    out = base_forward(case.base, x, case.base.weight, case.base.bias)
    want = merged_forward(case, x, multiplier)
    assert (want - out).abs().max() > 0.05          # the adaptation is visible at this size
    got = layer.bypass(x, out, case.base, multiplier)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multiplier_zero_is_base_exactly(case: Case):
    layer, x = parsed(case), case.x()
    out = base_forward(case.base, x, case.base.weight, case.base.bias)
    assert torch.equal(layer.bypass(x, out, case.base, 0.0), out)
    assert not layer.diff_weight(case.base, 0.0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_precision_bypass(case: Case, dtype: torch.dtype):
    layer, x = parsed(case), case.x()
    want = merged_forward(case, x, MULT)
    b = case.base
    half = LayerSpec(b.kind, b.weight.to(dtype), None if b.bias is None else b.bias.to(dtype), b.stride, b.padding,
                     b.dilation, b.groups, b.norm_eps, b.norm_groups)
    xh = x.to(dtype)
    out = base_forward(half, xh, half.weight, half.bias)
    got = layer.to(dtype=dtype).bypass(xh, out, half, MULT)
    assert got.dtype == dtype
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=0)


def test_dora_vector_cached_per_weight_and_dtype():
    """The DoRA norm vector is computed once per (base weight, dtype, device) and is a vector;
    a weight changed in place is recomputed, entries of freed weights are dropped."""
    layer = parse_layer(fa.lora_group(OUT, IN, RANK, dora="out"), "dora", None)
    packed = torch.randn(3 * OUT, IN) / math.sqrt(IN)            # OpenCLIP-style packed q/k/v
    q = LayerSpec("linear", packed[:OUT], None)
    k = LayerSpec("linear", packed[OUT:2 * OUT], None)
    x = torch.randn(2, 3, IN)

    def check(spec: LayerSpec) -> None:
        got = layer.bypass(x, F.linear(x, spec.weight), spec, 1.0)
        torch.testing.assert_close(got, F.linear(x, spec.weight + layer.diff_weight(spec, 1.0)), atol=1e-5, rtol=1e-5)

    for spec in (q, k, q, k):
        check(spec)
    cache = layer._dora_cache
    assert len(cache) == 2 and all(v.shape == (OUT,) for entry in cache.values() for v in entry[2:])
    first = layer._dora_vectors(q, "out", x)
    assert all(a is b for a, b in zip(first, layer._dora_vectors(q, "out", x)))      # no recompute
    xb = x.bfloat16()
    layer.bypass(xb, F.linear(xb, q.weight.bfloat16()), LayerSpec("linear", q.weight.bfloat16(), None), 1.0)
    assert len(cache) == 3                     # one more dtype (its weight, a temporary, is gone already)
    with torch.no_grad():
        packed[:OUT] *= 2                      # the base weight changed in place: recomputed, not stale
    check(q)
    assert len(cache) == 2                     # the bf16 entry of the freed weight was dropped
    del k, spec
    check(LayerSpec("linear", packed[2 * OUT:], None))
    assert len(cache) == 2                     # k's view is freed: its entry went


def test_lokr_bypass_never_builds_the_weight(monkeypatch):
    """LoKr's bypass is the factored form: torch.kron is never called on the bypass path."""
    case = next(c for c in CASES if c.name == "lokr-conv-w1factors-w2tucker")
    layer, x = parsed(case), case.x()
    out = base_forward(case.base, x, case.base.weight, case.base.bias)
    want = merged_forward(case, x, MULT)

    def no_kron(*args, **kwargs):
        raise AssertionError("kron on the bypass path")
    monkeypatch.setattr(torch, "kron", no_kron)
    torch.testing.assert_close(layer.bypass(x, out, case.base, MULT), want, atol=1e-4, rtol=1e-4)


# --- (3) check messages -------------------------------------------------------------------------

def message(group: dict, base: LayerSpec) -> str | None:
    return parse_layer(group, "layer", None).check(base)


def test_check_lora_wrong_shapes():
    base = LayerSpec("linear", torch.empty(320, 320), None)
    assert message(fa.lora_group(320, 768, 8), base) == \
        "lora_up 320x8 / lora_down 8x768 do not fit a 320x320 Linear"
    conv3 = LayerSpec("conv", torch.empty(OUT, IN, 3, 3), None, padding=(1, 1))
    assert message(fa.lora_group(OUT, IN, RANK, kernel=(1, 1)), conv3) == \
        f"lora_up {OUT}x{RANK}x1x1 / lora_down {RANK}x{IN}x1x1 do not fit a {OUT}x{IN}x3x3 Conv2d"
    assert "lora_mid 4x4x3x3" in message(fa.lora_group(OUT, IN, RANK, kernel=(3, 3), mid=True),
                                         LayerSpec("linear", torch.empty(OUT, IN), None))
    assert message(fa.lora_group(OUT, IN, RANK), norm_base()) == f"lora parts cannot adapt a {OUT} LayerNorm"
    grouped = LayerSpec("conv", torch.empty(OUT, IN // 2, 3, 3), None, groups=2)
    assert "grouped convolution" in message(fa.lora_group(OUT, IN // 2, RANK, kernel=(3, 3)), grouped)


def test_layernorm_with_zero_groups():
    """norm_groups 0 means a LayerNorm too (None is the documented value)."""
    g, x = fa.norm_group(OUT), torch.randn(2, 5, OUT)
    ln, zero = norm_base(), LayerSpec("norm", norm_base().weight, norm_base().bias, norm_eps=1e-6, norm_groups=0)
    layer = parse_layer(g, "n", None)
    out = base_forward(ln, x, ln.weight, ln.bias)
    assert torch.equal(layer.bypass(x, out, zero, MULT), layer.bypass(x, out, ln, MULT))


def test_check_other_algorithms_wrong_shapes():
    lin = LayerSpec("linear", torch.empty(OUT, IN), None)
    assert message(fa.loha_group(OUT, IN + 2, 3), lin).endswith(f"do not fit a {OUT}x{IN} Linear")
    assert "lokr w1 3x2 and w2 4x6" in message(fa.lokr_group(OUT, 12, 2, w1_shape=(3, 2), w2="full"), lin)
    assert message(fa.lokr_group(OUT, IN, 2, kernel=(3, 3), w2="tucker"), lin).startswith("lokr w1")
    assert message(fa.full_group(OUT, IN + 1), lin) == f"diff {OUT}x{IN + 1} does not fit a {OUT}x{IN} Linear"
    assert message(fa.norm_group(OUT), lin) == f"w_norm / b_norm parts cannot adapt a {OUT}x{IN} Linear"
    assert message(fa.norm_group(OUT + 1), norm_base(groups=4)) == \
        f"w_norm / b_norm {OUT + 1} / {OUT + 1} do not fit a {OUT} GroupNorm (4 groups)"
    bad_dora = fa.lora_group(OUT, IN, RANK) | {"dora_scale": torch.ones(1, OUT)}
    assert message(bad_dora, lin) == f"dora_scale 1x{OUT} is neither per output row nor per input column " \
                                     f"of a {OUT}x{IN} Linear"
    assert message(fa.full_group(OUT, IN), LayerSpec("linear", torch.empty(OUT + 1, IN), None)) is not None


# --- (3) parse errors ---------------------------------------------------------------------------

def parse_error(group: dict) -> str:
    with pytest.raises(ModelFileError) as err:
        parse_layer(group, "lora_unet_down_blocks_0_proj_in", "my_lora.safetensors")
    text = str(err.value)
    assert text.startswith("my_lora.safetensors: adapter layer lora_unet_down_blocks_0_proj_in: ")
    return text


def test_parse_refuses_non_finite_values():
    g = fa.lora_group(OUT, IN, RANK)
    g["lora_up.weight"][0, 0] = float("nan")
    assert "lora_up.weight 12x4 contains NaN or infinite values" in parse_error(g)
    g = fa.loha_group(OUT, IN, 3)
    g["hada_w2_b"][1, 1] = float("inf")
    assert "hada_w2_b" in parse_error(g)
    nan_alpha = fa.lora_group(OUT, IN, RANK) | {"alpha": torch.tensor(float("nan"))}
    assert "alpha scalar contains NaN" in parse_error(nan_alpha)
    g = {k: v.half() for k, v in fa.lokr_group(OUT, IN, 2).items()}
    g["lokr_w1"][0, 0] = float("-inf")
    assert "lokr_w1" in parse_error(g)


def test_parse_refuses_incomplete_and_inconsistent_groups():
    lora = fa.lora_group(OUT, IN, RANK)
    assert "incomplete LoRA: has lora_up.weight but no lora_down.weight" in \
        parse_error({"lora_up.weight": lora["lora_up.weight"]})
    assert "lora_up 12x4 has rank 4 but lora_down 3x10 has rank 3" in \
        parse_error(lora | {"lora_down.weight": torch.randn(3, IN)})
    assert "lora_mid" in parse_error(fa.lora_group(OUT, IN, RANK, kernel=(3, 3), mid=True)
                                     | {"lora_mid.weight": torch.randn(RANK, RANK + 1, 3, 3)})
    loha = fa.loha_group(OUT, IN, 3)
    assert "incomplete LoHa: no hada_w2_b" in parse_error({k: v for k, v in loha.items() if k != "hada_w2_b"})
    assert "do not chain" in parse_error(loha | {"hada_w2_b": torch.randn(2, IN)})
    assert "different shapes" in parse_error(loha | {"hada_w2_a": torch.randn(OUT + 1, 3)})
    lokr = fa.lokr_group(OUT, IN, 2, w1="factors")
    assert "incomplete LoKr: no lokr_w2" in parse_error({k: v for k, v in lokr.items() if "w2" not in k})
    assert "has both lokr_w1 and its factors" in parse_error(lokr | {"lokr_w1": torch.randn(3, 2)})
    assert "lokr_w1_a" in parse_error(lokr | {"lokr_w1_b": torch.randn(3, 2)})
    assert "incomplete full difference" in parse_error({"diff_b": torch.randn(OUT)})
    assert "incomplete norm difference" in parse_error({"b_norm": torch.randn(OUT)})


def test_parse_refuses_unknown_and_mixed_groups():
    assert "no LoRA/LoCon, LoHa, LoKr, full or norm weights (only oft_blocks)" in \
        parse_error({"oft_blocks": torch.randn(2, 3, 3)})
    assert "(only alpha)" in parse_error({"alpha": torch.tensor(4.0)})
    mixed = fa.lora_group(OUT, IN, RANK) | {"hada_w1_a": torch.randn(OUT, 2)}
    assert "mixes parts of LoRA and LoHa" in parse_error(mixed)
    stray = fa.lora_group(OUT, IN, RANK) | {"on_input": torch.ones(1)}
    assert "on_input is not part of a LoRA layer" in parse_error(stray)
    assert "alpha should be one number but is 2" in parse_error(fa.lora_group(OUT, IN, RANK) | {"alpha": torch.ones(2)})
    assert "dora_scale on a norm difference" in parse_error(fa.norm_group(OUT) | {"dora_scale": torch.ones(OUT)})


def test_parse_without_source_and_ignored_bias_parts():
    with pytest.raises(ModelFileError, match=r"^\(in memory\): adapter layer x: "):
        parse_layer({"lora_up.weight": torch.ones(2, 2)}, "x", None)
    g = fa.lora_group(OUT, IN, RANK)
    plain = parse_layer(g, "x", None)
    with_bias = parse_layer(g | {"bias_indices": torch.arange(3), "bias_values": torch.ones(3)}, "x", None)
    base = linear_base()
    torch.testing.assert_close(with_bias.diff_weight(base, 1.0), plain.diff_weight(base, 1.0))


def test_scale_part_overrides_alpha():
    """A1111 calc_scale: a `scale` part wins over alpha / rank."""
    g = fa.lora_group(OUT, IN, RANK)
    layer = parse_layer(g | {"scale": torch.tensor(0.25)}, "x", None)
    base = linear_base()
    want = g["lora_up.weight"] @ g["lora_down.weight"] * 0.25
    torch.testing.assert_close(layer.diff_weight(base, 1.0), want)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_chained_adapters_add(kind: str):
    """Two adapters through bypass, one after the other, equal W + d1 + d2 (DoRA's taken against W too)."""
    if kind == "linear":
        base, x = linear_base(), torch.randn(2, 5, IN)
        groups = [fa.lora_group(OUT, IN, RANK, dora="out", seed=1), fa.loha_group(OUT, IN, 2, dora="in", seed=2),
                  fa.full_group(OUT, IN, seed=3)]
    else:
        base, x = conv_base(), torch.randn(*CONV_X)
        groups = [fa.lora_group(OUT, IN, RANK, kernel=(3, 3), dora="out", seed=1),
                  fa.lokr_group(OUT, IN, 2, kernel=(3, 3), dora="in", seed=2)]
    layers = [parse_layer(g, f"a{i}", None) for i, g in enumerate(groups)]
    mults = [0.8, -0.5, 1.2][:len(layers)]
    out = base_forward(base, x, base.weight, base.bias)
    got = out
    for layer, m in zip(layers, mults):
        got = layer.bypass(x, got, base, m)
    weight, bias = base.weight.clone(), base.bias.clone()
    for g, m in zip(groups, mults):
        case = Case("chain", {"lora_up.weight": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr", "diff": "full"}
                    [next(k for k in g if k in ("lora_up.weight", "hada_w1_a", "lokr_w1", "diff"))], base, g, ())
        dw, db = reference_diff(case, m)
        weight, bias = weight + dw, bias if db is None else bias + db
    torch.testing.assert_close(got, base_forward(base, x, weight, bias), atol=1e-4, rtol=1e-4)
