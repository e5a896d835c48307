"""The Delta Sampling step against hand computations (DESIGN.md §2), with a stub source pair that
returns known predictions and records what it was asked."""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from lib_deltasampling.engine.bridge import native_latent_size, resize_latent
from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler, GenerationInterrupted
from lib_deltasampling.engine.schedule import compute_steps, step_weights
from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.detect import Family

SD1, SDXL = 0.18215, 0.13025


class StubPair:
    """Predictions: base_u = x + 1, base_c = x + 2, adapted_u = x + 1 + du, adapted_c = x + 2 + dc
    (per image row r: + 0.1 r), so D_A - D_S = du + w (dc - du) exactly."""

    def __init__(self, source_scale: float = SD1, du: float = 0.5, dc: float = 3.0, family=Family.SD1):
        self.base = SimpleNamespace(latent_scale=source_scale, family=family, prediction="eps")
        self.du, self.dc = du, dc
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []
        self.encoded: list[tuple] = []

    def encode(self, prompts, negatives, adapted, adapted_negatives, *, width, height, embeddings, adapted_embeddings):
        self.encoded.append((list(prompts), negatives and list(negatives), list(adapted),
                             adapted_negatives and list(adapted_negatives), width, height))
        return SimpleNamespace(full=negatives is not None, index=len(self.encoded) - 1)

    def denoise(self, x, sigma, conds):
        self.calls.append((x.clone(), sigma.clone(), conds))
        rows = 0.1 * torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1, 1, 1)
        bu, bc = x + 1 + rows, x + 2 + rows
        au, ac = bu + self.du, bc + self.dc
        return (bu, bc, au, ac) if conds.full else (bc, ac)

    @contextmanager
    def running(self):
        yield self


def make(pair, params=DeltaParams(), *, steps=10, cfg=7.0, target_scale=SD1, batch=1, size=(4, 6), prompts=None,
         mask=None, should_stop=None, sigma0=14.6, c0=14.6):
    noise = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(0))
    prompts = prompts or ["a cat"] * batch
    return DeltaSampler.prepare(pair, params, prompts=prompts, negative_prompts=[""] * batch,
                                adapted_prompts=[p + ", style" for p in prompts], adapted_negative_prompts=[""] * batch,
                                steps=steps, cfg_scale=cfg, target_scale=target_scale, noise=noise,
                                noise_multiplier=c0, sigma0=sigma0, generate_mask=mask, should_stop=should_stop)


def test_formula_per_branch_cfg_and_sign():
    pair = StubPair(du=0.5, dc=3.0)
    s = make(pair, DeltaParams(scale=1.5), cfg=7.0)
    x, d_t = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    out = s(x, torch.tensor([5.0]), 3, 10, d_t)
    # D_A - D_S = (du + 7 (dc - du)) = 0.5 + 7 * 2.5 = 18.0; lambda 1.5; same scale factors: bridge 1
    assert torch.allclose(out, d_t + 1.5 * 18.0, atol=1e-5)
    # the source saw the target's latent unchanged (equal scale factors) and the same sigma
    assert torch.equal(pair.calls[0][0], x) and torch.equal(pair.calls[0][1], torch.tensor([5.0]))


def test_source_cfg_overrides_the_hosts_and_cond_mode_uses_two_evaluations():
    out = make(StubPair(), DeltaParams(source_cfg=3.0))(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), 0, 10,
                                                         torch.zeros(1, 4, 4, 6))
    assert torch.allclose(out, torch.full_like(out, 0.5 + 3.0 * 2.5))
    pair = StubPair()
    s = make(pair, DeltaParams(guidance="cond"))
    out = s(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), 0, 10, torch.zeros(1, 4, 4, 6))
    assert torch.allclose(out, torch.full_like(out, 3.0))           # adapted_c - base_c = dc
    assert pair.encoded[0][1] is None and pair.encoded[0][3] is None  # no negatives encoded


def test_bridging_between_scale_factors():
    """SD1.5 source (0.18215) on an SDXL target (0.13025): the source sees
    x_s = c n + (s_S/s_T)(x - c n), c = c0 sigma / sigma0, and its delta enters times s_T/s_S."""
    pair = StubPair(source_scale=SD1)
    s = make(pair, DeltaParams(scale=2.0), target_scale=SDXL, sigma0=14.6, c0=math.sqrt(1 + 14.6 ** 2))
    x, d_t, sigma = torch.randn(1, 4, 4, 6), torch.zeros(1, 4, 4, 6), 3.0
    out = s(x, torch.tensor([sigma]), 0, 10, d_t)
    c = math.sqrt(1 + 14.6 ** 2) * sigma / 14.6
    n = s.noise
    want_xs = c * n + (SD1 / SDXL) * (x - c * n)
    assert torch.allclose(pair.calls[0][0], want_xs, atol=1e-5)
    assert torch.allclose(out, torch.full_like(out, 2.0 * 18.0 * SDXL / SD1), atol=1e-5)


@pytest.mark.parametrize("shape, expected", [
    ("constant", [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]),
    ("linear", [0, 0, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0]),
    ("cosine", [0, 0] + [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.2, 0.4, 0.6, 0.8)] + [0, 0, 0]),
    # by hand: (s(10 (1/2 - p)) - s(-5)) / (s(5) - s(-5)), s the logistic; s(5) = 0.993307, s(3) = 0.952574, s(1) = 0.731059
    ("sigmoid", [0, 0, 1, 0.958714, 0.734194, 0.265806, 0.041286, 0, 0, 0]),
])
def test_schedule_shapes_and_window_edges(shape, expected):
    # window [0.2, 0.7) of 10 steps = steps 2..6 (0.7 itself is outside); p = (i/10 - 0.2) / 0.5
    weights = step_weights(10, 2.0, 0.2, 0.7, shape)
    assert weights == pytest.approx([2.0 * e for e in expected], abs=1e-5)  # the sigmoid row has 6 digits
    pair = StubPair()
    s = make(pair, DeltaParams(scale=2.0, start=0.2, end=0.7, shape=shape))
    x, d_t = torch.zeros(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    for step in range(10):
        out = s(x, torch.tensor([1.0]), step, 10, d_t)
        if expected[step] == 0:
            assert out is d_t  # untouched, and no source forward
        else:
            assert torch.allclose(out, d_t + 2.0 * expected[step] * 18.0, atol=1e-4)
    assert len(pair.calls) == 5


def test_reuse_interval_runs_the_source_every_kth_window_step():
    assert compute_steps(10, 0.2, 0.9, 3) == [False, False, True, False, False, True, False, False, True, False]
    pair = StubPair()
    s = make(pair, DeltaParams(start=0.2, end=0.9, reuse=3))
    d_t = torch.zeros(1, 4, 4, 6)
    outs = []
    for step in range(10):
        pair.dc = 3.0 + step  # the source's answer changes every step; reused steps keep the last one
        outs.append(s(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), step, 10, d_t)[0, 0, 0, 0].item())
    assert len(pair.calls) == 3
    delta = {2: 0.5 + 7 * (5.0 - 0.5), 5: 0.5 + 7 * (8.0 - 0.5), 8: 0.5 + 7 * (11.0 - 0.5)}
    want = [0, 0, delta[2], delta[2], delta[2], delta[5], delta[5], delta[5], delta[8], 0]
    assert outs == pytest.approx(want)


def test_inpainting_mask_keeps_the_preserved_area():
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., :, 3:] = 1.0   # generate the right half only
    s = make(StubPair(), mask=mask)
    d_t = torch.randn(1, 4, 4, 6)
    out = s(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), 0, 10, d_t)
    assert torch.equal(out[..., :3], d_t[..., :3])
    assert torch.allclose(out[..., 3:], d_t[..., 3:] + 18.0)


def test_batch_rows_get_their_own_delta():
    class RowPair(StubPair):
        def denoise(self, x, sigma, conds):
            bu, bc, au, ac = super().denoise(x, sigma, conds)
            rows = torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1, 1, 1)
            return bu, bc, au + rows, ac + 2 * rows
    s = make(RowPair(), batch=3, prompts=["a", "b", "c"])
    out = s(torch.zeros(3, 4, 4, 6), torch.tensor([1.0, 1.0, 1.0]), 0, 10, torch.zeros(3, 4, 4, 6))
    for r in range(3):  # du + r + 7 (dc + 2r - du - r) = 18 + 8 r
        assert torch.allclose(out[r], torch.full_like(out[r], 18.0 + 8 * r))


def test_second_order_calls_share_the_step():
    pair = StubPair()
    s = make(pair, DeltaParams(start=0.0, end=0.5))
    d_t = torch.zeros(1, 4, 4, 6)
    for step in range(10):
        for sigma in (2.0, 1.0):  # Heun-like: two evaluations per step
            s(torch.zeros(1, 4, 4, 6), torch.tensor([sigma]), step, 10, d_t)
    assert len(pair.calls) == 10  # steps 0..4, twice each: the window follows steps, not calls


def test_lambda_zero_is_the_target_alone():
    pair = StubPair()
    s = make(pair, DeltaParams(scale=0.0))
    d_t = torch.randn(1, 4, 4, 6)
    assert all(s(torch.randn(1, 4, 4, 6), torch.tensor([1.0]), i, 10, d_t) is d_t for i in range(10))
    assert pair.calls == []


def test_prompt_editing_segments_are_encoded_once_each():
    pair = StubPair()
    s = make(pair, steps=6, prompts=["a [cat:dog:3] sitting"])
    assert [e[0] for e in pair.encoded] == [["a cat sitting"], ["a dog sitting"]]
    assert [e[2] for e in pair.encoded] == [["a cat sitting, style"], ["a dog sitting, style"]]
    assert s.conds_at(3).index == 0 and s.conds_at(4).index == 1   # A1111: step <= end_at_step


def test_native_resolution_runs_the_source_small_and_upsamples_the_delta():
    pair = StubPair(source_scale=SD1)
    s = make(pair, DeltaParams(resolution="native"), target_scale=SDXL, size=(128, 96))
    assert s.source_size == native_latent_size(128, 96, 512) == (74, 55)
    out = s(torch.zeros(1, 4, 128, 96), torch.tensor([1.0]), 0, 10, torch.zeros(1, 4, 128, 96))
    assert pair.calls[0][0].shape[-2:] == (74, 55)
    assert out.shape == (1, 4, 128, 96)
    assert pair.encoded[0][4:] == (55 * 8, 74 * 8)  # SDXL's size conditioning would use the source's size
    assert torch.allclose(out, torch.full_like(out, 18.0 * SDXL / SD1), atol=1e-4)


def test_resize_latent_area_down_bilinear_up():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resize_latent(x, (2, 2))
    assert torch.equal(down, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # 2x2 block means
    assert resize_latent(x, (4, 4)) is x


def test_interrupt_stops_the_step():
    stop = {"now": False}
    s = make(StubPair(), should_stop=lambda: stop["now"])
    s(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), 0, 10, torch.zeros(1, 4, 4, 6))
    stop["now"] = True
    with pytest.raises(GenerationInterrupted):
        s(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), 1, 10, torch.zeros(1, 4, 4, 6))


@pytest.mark.parametrize("params, words", [
    (DeltaParams(start=0.5, end=0.5), "empty"), (DeltaParams(start=0.8, end=0.2), "empty"),
    (DeltaParams(shape="square"), "unknown shape"), (DeltaParams(guidance="half"), "unknown mode"),
    (DeltaParams(reuse=0), "below 1"), (DeltaParams(resolution="huge"), "unknown value")])
def test_bad_params_name_the_setting(params, words):
    with pytest.raises(SettingError, match=words):
        make(StubPair(), params)


def test_adapted_identical_to_base_gives_exactly_the_target_result(tmp_path, tokenizer):
    """Real tiny models: an adapted branch equal to the base (no adapter, same prompts) makes the
    delta exactly zero, so the corrected prediction is the target's, bit for bit."""
    import factories
    from lib_deltasampling.runtime.model import load_model
    from lib_deltasampling.runtime.pair import SourcePair
    from lib_deltasampling.runtime.placement import Placement

    path = factories.write_checkpoint(tmp_path / "sd1.safetensors", "sd1", seed=2)
    model = load_model(path, placement=Placement(torch.device("cpu"), torch.float32), tokenizer=tokenizer)
    noise = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    s = DeltaSampler.prepare(SourcePair(model), DeltaParams(scale=3.0), prompts=["a", "b"], negative_prompts=["", ""],
                             adapted_prompts=["a", "b"], adapted_negative_prompts=["", ""], steps=4, cfg_scale=5.0,
                             target_scale=SDXL, noise=noise, noise_multiplier=14.6, sigma0=14.6)
    d_t = torch.randn(2, 4, 6, 8)
    with s.running():
        out = s(noise * 14.6, torch.tensor([14.6, 14.6]), 0, 4, d_t)
    assert torch.equal(out, d_t)


class SlowPair(StubPair):
    def denoise(self, x, sigma, conds):
        import time
        time.sleep(0.02)
        return super().denoise(x, sigma, conds)


def test_stats_count_the_source_runs_and_their_time_across_passes():
    from lib_deltasampling.engine.sampler import SourceStats

    stats = SourceStats()
    first = make(SlowPair(), DeltaParams(start=0.0, end=0.5, reuse=2), steps=8)
    first.stats = stats
    x = torch.zeros(1, 4, 4, 6)
    for step in range(8):
        first(x, torch.tensor([1.0]), step, 8, x)
    assert stats.forwards == 2                                       # steps 0 and 2 of the window 0..3
    hires = make(SlowPair(), DeltaParams(), steps=2)
    hires.stats = stats                                              # the hires pass adds to the same stats
    for step in range(2):
        hires(x, torch.tensor([1.0]), step, 2, x)
    assert stats.forwards == 4 and 0.08 <= stats.seconds() < 5.0


def test_stats_on_cuda_record_events_and_sync_only_when_asked(monkeypatch):
    """On CUDA no host sync per step: two events per source run, summed once by `seconds()`."""
    from lib_deltasampling.engine.sampler import SourceStats

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream):
            log.append(("record", stream))
            self.t = len(log)

        def synchronize(self):
            log.append(("sync",))

        def elapsed_time(self, end):
            return 250.0 * (end.t - self.t)                          # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    stats = SourceStats()
    for _ in range(3):
        with stats.measure(torch.device("cuda", 1)):
            pass
    assert stats.forwards == 3 and ("sync",) not in log and len(log) == 6
    assert all(entry == ("record", "stream of cuda:1") for entry in log)
    assert stats.seconds() == pytest.approx(3 * 0.25) and log[-1] == ("sync",)
    assert stats.seconds() == pytest.approx(0.75)                   # summed once, kept
