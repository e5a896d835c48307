"""GraphedCall's logic on the CPU, with a stand-in for CUDA's capture and replay: eager first, captured
on the second call of a signature, inputs copied into static buffers (skipped for the very tensors
copied last, unless written in place since), one graph per signature, LRU eviction, and a failed
capture that turns the object eager with one log line. (The real CUDA path: bench/check_graphs.py.)"""

from __future__ import annotations

import dataclasses
import logging

import torch

from lib_deltasampling.runtime.graphs import GraphedCall, flatten, unflatten


class ReplayOnCpu:
    """Capture = remember the function and its static arguments; replay = run it on them again and
    write the result into the static output, as a CUDA graph writes into its buffers."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.captured = 0

    def usable(self, tensors):
        return bool(tensors)

    def capture(self, fn, args, device):
        if self.fail is not None:
            raise self.fail
        self.captured += 1
        output = fn(*args)
        return {"fn": fn, "args": args, "out": output}, output

    def replay(self, graph):
        graph["out"].copy_(graph["fn"](*graph["args"]))

    # a side stream: the replay is deferred until the caller waits for it, as another stream would
    # finish it only then; reading the output before waiting would see the previous step's values
    def stream(self, device):
        return "side"

    def replay_on(self, graph, stream, timing=None):
        self.launched = getattr(self, "launched", 0) + 1
        return graph

    def wait(self, graph):
        self.replay(graph)


@dataclasses.dataclass(frozen=True)
class Conds:
    context: dict
    rows: int


def step(x, sigma, conds):
    return x * sigma.reshape(-1, 1) + conds.context["c"].sum() * conds.rows


def args(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g), torch.rand(n, generator=g) + 0.5,
            Conds({"c": torch.randn(4, generator=g)}, 2))


def test_flatten_round_trips_tensors_containers_and_dataclasses():
    a = args()
    tensors, spec = flatten(a)
    assert len(tensors) == 3
    rebuilt = unflatten(spec, [t.clone() for t in tensors])
    assert isinstance(rebuilt[2], Conds) and rebuilt[2].rows == 2 and torch.equal(rebuilt[0], a[0])
    assert flatten(args(seed=1))[1] == spec            # same structure and shapes: same signature
    assert flatten(args(n=3))[1] != spec               # another batch: another signature


def test_eager_first_then_captured_then_replayed_with_new_inputs():
    backend = ReplayOnCpu()
    calls = []

    def counted(*a):
        calls.append(1)
        return step(*a)

    graphed = GraphedCall(counted, name="test", backend=backend)
    for seed in range(5):
        a = args(seed=seed)
        assert torch.allclose(graphed(*a), step(*a))
    assert backend.captured == 1 and graphed.captures == 1 and graphed.replays == 4


def test_static_inputs_are_copied_unless_the_same_unchanged_tensor():
    graphed = GraphedCall(step, name="test", backend=ReplayOnCpu())
    x, sigma, conds = args()
    graphed(x, sigma, conds)
    graphed(x, sigma, conds)                       # captured
    entry = next(iter(graphed._graphs.values()))
    context_buffer = entry.inputs[2]
    before = context_buffer.clone()
    x2 = torch.randn_like(x)
    assert torch.allclose(graphed(x2, sigma, conds), step(x2, sigma, conds))
    assert torch.equal(context_buffer, before)     # conditioning: the same object, not copied again
    conds.context["c"].mul_(2)                     # written in place: its version changed, copied again
    assert torch.allclose(graphed(x2, sigma, conds), step(x2, sigma, conds))
    other = Conds({"c": torch.ones(4)}, 2)         # another segment's conditioning: copied
    assert torch.allclose(graphed(x2, sigma, other), step(x2, sigma, other))


def test_inference_tensors_are_copied_every_time():
    """Forge samples under torch.inference_mode: its tensors have no version counter, so an
    in-place write cannot be seen; they are copied at every call (found on the H100: the capture
    itself failed with "Inference tensors do not track version counter")."""
    with torch.inference_mode():
        graphed = GraphedCall(step, name="test", backend=ReplayOnCpu())
        x, sigma, conds = args()
        for _ in range(2):                         # eager, then captured
            assert torch.allclose(graphed(x, sigma, conds), step(x, sigma, conds))
        conds.context["c"].mul_(3)                 # in place, unseen by any counter
        assert torch.allclose(graphed(x, sigma, conds), step(x, sigma, conds))
        assert graphed.captures == 1 and graphed.replays == 2


def test_one_graph_per_signature_and_least_recently_used_eviction():
    backend = ReplayOnCpu()
    graphed = GraphedCall(step, name="test", backend=backend, max_graphs=2)
    for n in (1, 1, 2, 2, 3, 3):
        graphed(*args(n=n))
    assert backend.captured == 3 and len(graphed._graphs) == 2    # batch 1's graph was evicted
    other_rows = args(n=2)
    other_rows = (*other_rows[:2], Conds(other_rows[2].context, 3))  # a constant differs: another signature
    graphed(*other_rows)
    assert backend.captured == 3                    # first call of that signature: eager
    with torch.inference_mode():                   # another mode: another signature
        graphed(*args(n=2))
    assert backend.captured == 3


def test_a_failed_capture_runs_eagerly_for_good_with_one_line(caplog):
    backend = ReplayOnCpu(fail=RuntimeError("operation not permitted when stream is capturing"))
    graphed = GraphedCall(step, name="Delta Sampling source step", backend=backend)
    with caplog.at_level(logging.INFO, logger="delta-sampling"):
        results = [graphed(*args(seed=s)) for s in range(4)]
    assert all(torch.allclose(r, step(*args(seed=s))) for s, r in enumerate(results))
    assert not graphed.enabled and graphed.replays == 0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["Delta Sampling source step: CUDA graph capture failed (RuntimeError: operation not "
                     "permitted when stream is capturing); running it eagerly"]


def test_off_and_on_the_cpu_it_is_the_plain_function():
    off = GraphedCall(step, name="test", enabled=False, backend=ReplayOnCpu())
    cpu = GraphedCall(step, name="test")          # the real backend: CPU tensors are never captured
    for g in (off, cpu):
        for s in range(3):
            assert torch.equal(g(*args(seed=s)), step(*args(seed=s)))
        assert g.captures == 0 and g.replays == 0


@dataclasses.dataclass(frozen=True)
class StubConds:
    full: bool
    index: int


def test_the_engine_step_is_the_same_through_the_graph_path():
    """DeltaSampler's per-step source computation through GraphedCall (stand-in replay) equals the
    eager step at every step, also when a step reuses the delta of an earlier one."""
    from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler
    from test_engine import StubPair

    class Pair(StubPair):
        def encode(self, *a, **kw):
            return StubConds(**vars(super().encode(*a, **kw)))

    def sampler(graphs: bool) -> DeltaSampler:
        noise = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
        s = DeltaSampler.prepare(Pair(), DeltaParams(scale=1.5, reuse=2), prompts=["a cat"], negative_prompts=[""],
                                 adapted_prompts=["a cat, style"], adapted_negative_prompts=[""], steps=6,
                                 cfg_scale=7.0, target_scale=0.13025, noise=noise, noise_multiplier=14.6,
                                 sigma0=14.6, cuda_graphs=graphs)
        s._source_delta.backend = ReplayOnCpu()
        return s

    eager, graphed = sampler(False), sampler(True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 4, 6, generator=g)
    for i, sigma in enumerate((10.0, 7.0, 5.0, 2.0, 1.0, 0.5)):
        s, d = torch.tensor([sigma]), torch.randn(x.shape, generator=g)
        assert torch.allclose(graphed(x, s, i, 6, d), eager(x, s, i, 6, d), atol=1e-6), i
        x = x * 0.8
    # steps 0, 2 and 4 run the source: eager, captured (and replayed), replayed
    assert graphed._source_delta.captures == 1 and graphed._source_delta.replays == 2


def test_prefetch_overlaps_the_replay_and_the_call_waits_for_it():
    """With `prefetch` before each call (as the WebUI hooks and the runner do), replays are launched
    on the side stream and the call uses them: results equal the eager step's at every step."""
    from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler, SourceStats
    from test_engine import StubPair

    class Pair(StubPair):
        def encode(self, *a, **kw):
            return StubConds(**vars(super().encode(*a, **kw)))

    def sampler(graphs: bool) -> DeltaSampler:
        noise = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
        s = DeltaSampler.prepare(Pair(), DeltaParams(scale=1.5), prompts=["a cat"], negative_prompts=[""],
                                 adapted_prompts=["a cat, style"], adapted_negative_prompts=[""], steps=6,
                                 cfg_scale=7.0, target_scale=0.13025, noise=noise, noise_multiplier=14.6,
                                 sigma0=14.6, cuda_graphs=graphs, stats=SourceStats())
        s._source_delta.backend = backend if graphs else s._source_delta.backend
        s.stats.cuda_events = lambda: (s.stats.__setattr__("forwards", s.stats.forwards + 1), None)[1]
        return s

    backend = ReplayOnCpu()
    eager, graphed = sampler(False), sampler(True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 4, 6, generator=g)
    for i, sigma in enumerate((10.0, 7.0, 5.0, 2.0, 1.0, 0.5)):
        s, d = torch.tensor([sigma]), torch.randn(x.shape, generator=g)
        for engine in (eager, graphed):
            engine.prefetch(x, s, i, 6)
        assert torch.allclose(graphed(x, s, i, 6, d), eager(x, s, i, 6, d), atol=1e-6), i
        x = x * 0.8
    # steps 0 and 1 ran in the call (eager, then captured); steps 2-5 were launched by prefetch
    assert backend.launched == 4 and graphed._source_delta.replays == 5 and graphed.stats.forwards == 6
    # a call for another x than the one prefetched computes its own
    graphed.prefetch(x, torch.tensor([0.3]), 5, 6)
    other = x + 1
    d = torch.zeros_like(x)
    assert torch.allclose(graphed(other, torch.tensor([0.3]), 5, 6, d), eager(other, torch.tensor([0.3]), 5, 6, d),
                          atol=1e-6)
