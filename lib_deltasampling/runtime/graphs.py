"""CUDA-graph replay of a per-step function: one launch instead of hundreds of kernel launches.

    delta = GraphedCall(compute_delta, name="source delta")
    out = delta(x, sigma, conds)          # CUDA: eager the first time, captured the second, replayed after

The function must be a pure function of its tensor arguments (and of state that stays put while
this object lives: weights, adapter hooks, the generation's noise), with no host syncs. Each
input signature (the arguments' structure, shapes, dtypes, devices, and the inference/autocast
mode) gets its own graph with static input buffers; a call copies its tensors into them, skipping
tensors that are the very objects copied last time (conditioning stays put for many steps), and
replays. The result is the graph's static output: valid until the next call, which overwrites it.

A signature is captured on its second call: the first runs eagerly, so one-off work (a prompt
segment used once, a pass of one step) never pays for a capture. A tensor written in place since
it was copied (its version changed) is copied again. Off CUDA, or when `enabled` is
False, calls run eagerly; a capture that fails turns this object eager for good, with one log line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("delta-sampling")


def flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors in `value` (tensors, tuples, lists, dicts, dataclasses, constants) and a hashable
    description of everything else, from which `unflatten` rebuilds it with other tensors."""
    tensors: list[torch.Tensor] = []

    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return ("T", tuple(v.shape), v.dtype, v.device)
        if isinstance(v, (tuple, list)):
            return (type(v), tuple(walk(x) for x in v))
        if isinstance(v, dict):
            return (dict, tuple((k, walk(x)) for k, x in v.items()))
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return (type(v), tuple((f.name, walk(getattr(v, f.name))) for f in dataclasses.fields(v)))
        return ("C", v)  # a constant: part of the signature (ints, floats, None, slices, strings)

    return tensors, walk(value)


def unflatten(spec: Any, tensors: list[torch.Tensor]) -> Any:
    it = iter(tensors)

    def build(s: Any) -> Any:
        kind = s[0]
        if kind == "T":
            return next(it)
        if kind == "C":
            return s[1]
        if kind in (tuple, list):
            return kind(build(x) for x in s[1])
        if kind is dict:
            return {k: build(x) for k, x in s[1]}
        return kind(**{name: build(x) for name, x in s[1]})

    return build(spec)


def _modes() -> tuple:
    try:
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    except (TypeError, AttributeError):  # torch < 2.4 (A1111 1.10 ships 2.1)
        autocast = (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype())
    return (torch.is_inference_mode_enabled(), torch.is_grad_enabled(), *autocast)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; None for an inference tensor (made under
    torch.inference_mode, as Forge samples), which has none: such an input is copied every time."""
    return None if t.is_inference() else t._version


class _Graph:
    def __init__(self, graph: Any, inputs: list[torch.Tensor], output: Any) -> None:
        self.graph = graph
        self.inputs = inputs              # static buffers the graph reads
        self.output = output              # static result the graph writes
        self.loaded: list[Any] = [None] * len(inputs)  # (tensor, version) of what was copied in last
        self.running: Any = None          # the event of a replay launched on another stream

    def load(self, tensors: list[torch.Tensor]) -> None:
        for i, (buffer, t) in enumerate(zip(self.inputs, tensors)):
            last = self.loaded[i]
            if last is None or last[0] is not t or last[1] is None or last[1] != t._version:
                buffer.copy_(t)                       # new, or written in place since (_version bumped)
                self.loaded[i] = (t, _version(t))


class CudaBackend:
    """How graphs are captured and replayed; tests put a stand-in here to run the logic on the CPU."""

    def usable(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(t.is_cuda for t in tensors)

    def capture(self, fn: Callable[..., Any], args: Any, device: torch.device) -> tuple[Any, Any]:
        """Warm up once on a side stream (as torch.cuda.make_graphed_callables does), then capture."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn(*args)
        return graph, output

    def replay(self, graph: Any) -> None:
        graph.replay()

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def replay_on(self, graph: Any, stream: Any, timing: tuple | None = None) -> Any:
        """Replay on `stream` once the caller's stream has reached this point (inputs loaded);
        returns an event the caller's stream waits on before reading the output."""
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            if timing is not None:
                timing[0].record(stream)
            graph.replay()
            if timing is not None:
                timing[1].record(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait(self, event: Any) -> None:
        torch.cuda.current_stream().wait_event(event)


class Launched:
    """A result still computing on another stream: `result()` orders the caller's stream after it
    (no host sync) and returns it."""

    def __init__(self, value: Any, done: Any, backend: CudaBackend) -> None:
        self._value, self._done, self._backend = value, done, backend

    def result(self) -> Any:
        self._backend.wait(self._done)
        return self._value


class GraphedCall:
    def __init__(self, fn: Callable[..., Any], *, name: str, enabled: bool = True, max_graphs: int = 3,
                 backend: CudaBackend | None = None) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.backend = backend or CudaBackend()
        self._graphs: OrderedDict[Any, _Graph] = OrderedDict()
        self._seen: set[Any] = set()
        self._stream: Any = None          # where `launch` replays
        self.replays = 0
        self.captures = 0

    def __call__(self, *args: Any) -> Any:
        entry, tensors = self._entry(args, capture=True)
        if entry is None:
            return self.fn(*args)
        self._load(entry, tensors)
        self.backend.replay(entry.graph)
        return entry.output

    def launch(self, *args: Any, timing: Callable[[], tuple] | None = None) -> Launched | None:
        """As a call that replays, but on a side stream, overlapping what the caller's stream does
        next (e.g. the host's own forward); `result()` waits for it. None when the call would not
        replay (eager, or not captured yet): then call instead. `timing()`: two CUDA events to
        record around the replay."""
        entry, tensors = self._entry(args, capture=False)
        if entry is None:
            return None
        if self._stream is None:
            self._stream = self.backend.stream(tensors[0].device)
        self._load(entry, tensors)
        entry.running = self.backend.replay_on(entry.graph, self._stream, timing() if timing else None)
        return Launched(entry.output, entry.running, self.backend)

    def _entry(self, args: tuple, *, capture: bool) -> tuple[_Graph | None, list[torch.Tensor]]:
        """The graph for these arguments' signature and their tensors; None to run eagerly. With
        `capture`, a signature seen once before is captured now."""
        if not self.enabled:
            return None, []
        tensors, spec = flatten(args)
        if not self.backend.usable(tensors):
            return None, []
        key = (spec, _modes())
        try:
            entry = self._graphs.get(key)
        except TypeError:  # an argument that cannot be part of a signature (unhashable): no graph
            return None, []
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry, tensors
        if not capture:
            return None, []
        if key not in self._seen:          # first call of this signature: eager
            self._seen.add(key)
            return None, []
        return self._capture(key, spec, tensors), tensors

    def _load(self, entry: _Graph, tensors: list[torch.Tensor]) -> None:
        if entry.running is not None:      # a replay still reading the buffers (its result never awaited)
            self.backend.wait(entry.running)
            entry.running = None
        entry.load(tensors)                # on the caller's stream, so later in-place writes cannot race
        self.replays += 1

    def _capture(self, key: Any, spec: Any, tensors: list[torch.Tensor]) -> _Graph | None:
        inputs = [t.detach().clone() for t in tensors]
        try:
            graph, output = self.backend.capture(self.fn, unflatten(spec, inputs), tensors[0].device)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly instead, and say so once
            self.enabled = False
            self._graphs.clear()
            log.info("%s: CUDA graph capture failed (%s: %s); running it eagerly", self.name,
                     exc.__class__.__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return None
        entry = _Graph(graph, inputs, output)
        entry.loaded = [(t, _version(t)) for t in tensors]  # the buffers were cloned from exactly these
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)  # the least recently used signature; its memory goes with it
        return entry

    def reset(self) -> None:
        """Drop every graph and its memory (weights moved, adapters changed, generation over)."""
        self._graphs.clear()
        self._seen.clear()
