"""The extension in A1111 1.10's generation loop (the stand-in of tests/a1111 mirrors its order and
layouts): hooks, infotext, failures, passes and samplers, against the standalone engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factories
from test_adapters import build_adapter

TITLE = "Delta Sampling"


def setup_host(a1111, *, target_family="sd1"):
    a1111.add_checkpoint("target.safetensors", target_family, seed=0)
    a1111.add_checkpoint("source.safetensors", "sd1", seed=5)
    a1111.load_checkpoint("target")
    lora_dir = Path(a1111.shared.cmd_opts.lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    adapter, _ = build_adapter("sd1", "kohya", "lora", factories.checkpoint_tensors("sd1", seed=5))
    save_file(adapter, str(lora_dir / "moxin.safetensors"))
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
    a1111.create_ui()
    a1111.start_app()


def ds(**settings):
    return {TITLE: [{"enabled": True, "source_checkpoint": "source.safetensors", "adapters": "<lora:moxin:1>",
                     "scale": 2.0, **settings}]}


def our_callbacks(a1111) -> int:
    from lib_deltasampling.webui.hooks_cfg import PassHook
    return sum(isinstance(getattr(c.callback, "__self__", None), PassHook)
               for kind in ("callbacks_cfg_denoiser", "callbacks_cfg_after_cfg")
               for c in a1111.script_callbacks.callback_map[kind])


def test_smoke_txt2img(a1111):
    setup_host(a1111)
    plain = a1111.txt2img()
    gen = a1111.txt2img(ds())
    assert a1111.reports == []
    assert "Delta scale: 2.0" in gen.processed.infotexts[0]
    assert not torch.equal(gen.processed.images[0], plain.processed.images[0])
    assert our_callbacks(a1111) == 0


def test_txt2img_equals_the_engine_driven_directly(a1111, tokenizer):
    """The same generation without the WebUI: target CFG + DeltaSampler + Euler on A1111's sigmas."""
    from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler
    from lib_deltasampling.runner.sampling import (ImageNoise, a1111_schedule_table, get_sigmas, latent_shape,
                                                   sample_euler)
    from lib_deltasampling.runtime.adapters.apply import AdapterSet
    from lib_deltasampling.runtime.model import load_model
    from lib_deltasampling.runtime.pair import SourcePair
    from lib_deltasampling.runtime.placement import Placement

    setup_host(a1111)
    gen = a1111.txt2img(ds(scale=1.5, guidance="full"), prompt="a red fox", negative_prompt="blurry", steps=4,
                        seed=11, cfg_scale=6.0)
    assert a1111.reports == []

    cpu = Placement(torch.device("cpu"), torch.float32)
    def file(name):
        return a1111.sd_models.get_closet_checkpoint_match(name).filename

    target = load_model(file("target.safetensors"), placement=cpu, tokenizer=tokenizer)
    source = load_model(file("source.safetensors"), placement=cpu, tokenizer=tokenizer)
    for m in (target, source):  # A1111 keeps alphas_cumprod in float32: use its table on both sides
        m.denoiser.schedule = a1111_schedule_table()
    adapters = AdapterSet(source.components(), source.family)
    adapters.add(Path(a1111.shared.cmd_opts.lora_dir) / "moxin.safetensors")
    pair = SourcePair(source, adapters)
    sigmas = get_sigmas("Automatic", 4, a1111_schedule_table(), sampler="Euler")
    noise = ImageNoise([11], latent_shape(64, 64)).first()
    cond = target.encode(["a red fox"], width=64, height=64)
    uncond = target.encode(["blurry"], width=64, height=64, negative=True)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def reference(scale):
        engine = DeltaSampler.prepare(pair, DeltaParams(scale=scale), prompts=["a red fox"],
                                      negative_prompts=["blurry"], adapted_prompts=["a red fox"],
                                      adapted_negative_prompts=["blurry"], steps=4, cfg_scale=6.0,
                                      target_scale=0.18215, noise=noise, noise_multiplier=1.0, sigma0=1.0)

        def model(x, sigma, step):
            c, u = target.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            return engine(x, sigma, step, 4, u + 6.0 * (c - u))

        with engine.running():
            return sample_euler(model, noise * sigmas[0], sigmas)[0]

    want = reference(1.5)
    got = gen.processed.images[0]
    # Same math, different float32 rounding (row order of the batched forwards, scalings done in
    # sigma's dtype). A rounding error is relative to the magnitudes summed in a reduction, not to
    # the element that receives it: a conv/matmul output carries about sqrt(n) * eps * (the largest
    # |inputs|) whatever its own value, so an element near 0 can be off as much as one near max |x|.
    # Each of the 4 steps adds such an error and Euler carries the earlier ones on. Hence an absolute
    # bound: steps x 64 eps x max |x| (64 ~ sqrt of the reductions' lengths here, with margin). Seen:
    # 4.4e-4 to 4.7e-4 on max |x| 85 (about 47 eps x max |x|) with torch 2.13/2.14 on CPUs; the bound
    # is ~5x that, and a scale of 1.51 instead of 1.5 is off by 0.2, ~75x the bound.
    bound = 4 * 64 * torch.finfo(torch.float32).eps * want.abs().max().item()
    assert (got - want).abs().max().item() <= bound
    # ... and it still sees a small real mismatch: a scale of 1.51 instead of 1.5
    assert (got - reference(1.51)).abs().max().item() > 10 * bound


def test_infotext_parses_back_to_the_settings(a1111):
    from lib_deltasampling.engine.infotext import parse_parameters, settings_from_infotext
    from lib_deltasampling.engine.settings import DeltaSettings

    setup_host(a1111)
    chosen = dict(scale=2.5, start=0.25, end=0.75, schedule="linear", source_cfg=3.0, reuse=2,
                  adapters='<lora:moxin:0.7> ink, "wash"')
    gen = a1111.txt2img(ds(**chosen), steps=4)
    _, _, params = parse_parameters(gen.processed.infotexts[0])
    restored, warnings = settings_from_infotext(params)
    assert warnings == [] and restored == DeltaSettings(enabled=True, source_checkpoint="source.safetensors", **chosen)
    assert len(params["Delta source hash"]) == 10 and params["Delta adapter hashes"].startswith("moxin: ")


def test_off_costs_nothing_and_frees_models(a1111):
    from lib_deltasampling.webui.state import CACHE

    setup_host(a1111)
    a1111.txt2img(ds())
    assert CACHE.loaded  # kept for the next generation with the same settings
    registered = []
    a1111.script_callbacks.on_cfg_denoiser = lambda fn, *a, **k: registered.append(fn)  # no registration at all
    off = a1111.txt2img({TITLE: [{"enabled": False, "source_checkpoint": "source.safetensors"}]})
    assert registered == [] and CACHE.loaded == [] and "Delta" not in off.processed.infotexts[0]


@pytest.mark.parametrize("sampler", ["DDIM", "Heun", "Euler a", "DPM++ 2M"])
def test_samplers_scale_zero_is_the_plain_image(a1111, sampler):
    setup_host(a1111)
    plain = a1111.txt2img(sampler_name=sampler, steps=4)
    zero = a1111.txt2img(ds(scale=0.0), sampler_name=sampler, steps=4)
    delta = a1111.txt2img(ds(scale=2.0), sampler_name=sampler, steps=4)
    assert a1111.reports == []
    assert torch.equal(zero.processed.images[0], plain.processed.images[0])
    assert not torch.equal(delta.processed.images[0], plain.processed.images[0])
    assert our_callbacks(a1111) == 0


def test_a_bad_source_stops_the_generation_visibly(a1111):
    setup_host(a1111)
    gen = a1111.txt2img(ds(source_checkpoint="missing.safetensors"))
    assert gen.processed.images == [] and a1111.shared.state.interrupted
    assert any("missing.safetensors" in c and "checkpoint list" in c for c in gen.p.comments)
    assert our_callbacks(a1111) == 0


def test_a_failure_inside_a_step_leaves_no_claim_and_no_hook(a1111, monkeypatch):
    from lib_deltasampling.runtime.pair import SourcePair

    setup_host(a1111)

    def broken(self, x, sigma, conds):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(SourcePair, "denoise", broken)
    gen = a1111.txt2img(ds(), steps=4)
    assert a1111.shared.state.interrupted
    assert all("Delta" not in text for text in gen.processed.infotexts)
    assert any("internal error" in c and "simulated" in c for c in gen.p.comments)
    assert our_callbacks(a1111) == 0


def test_hires_pass_follows_the_setting(a1111, monkeypatch):
    from lib_deltasampling.webui.hooks_cfg import PassHook

    setup_host(a1111)
    installs = []
    original = PassHook.install
    monkeypatch.setattr(PassHook, "install", lambda self: (installs.append(self), original(self))[1])
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6, hr_upscaler="Latent")
    gen = a1111.txt2img(ds(hires=True), **hires)
    assert len(installs) == 2 and a1111.reports == [] and gen.processed.images[0].shape[-1] == 12
    installs.clear()
    a1111.txt2img(ds(hires=False), **hires)
    assert len(installs) == 1 and our_callbacks(a1111) == 0


def test_a_pass_announced_twice_is_prepared_once(a1111, monkeypatch):
    """Forge calls process_before_every_sampling twice for the hires pass (modules/processing.py
    sample_hr_pass, before and after resetting forge_objects), with the same noise: the delta is
    prepared and installed once per pass, the image is the one of a single call, and every batch
    iteration (a new noise tensor) still gets its own pass."""
    from lib_deltasampling.webui.hooks_cfg import PassHook

    setup_host(a1111)
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6, hr_upscaler="Latent",
                 n_iter=2)
    once = a1111.txt2img(ds(hires=True), **hires)
    installs = []
    original_install = PassHook.install
    monkeypatch.setattr(PassHook, "install", lambda self: (installs.append(self), original_install(self))[1])
    runner = type(a1111.scripts.scripts_txt2img)
    original = runner.process_before_every_sampling

    def twice(self, p, **kwargs):
        original(self, p, **kwargs)
        original(self, p, **kwargs)
    monkeypatch.setattr(runner, "process_before_every_sampling", twice)
    doubled = a1111.txt2img(ds(hires=True), **hires)
    assert a1111.reports == [] and len(installs) == 4           # 2 iterations x (first pass + hires pass)
    assert all(torch.equal(a, b) for a, b in zip(doubled.processed.images, once.processed.images))
    assert our_callbacks(a1111) == 0


def test_batches_and_prompts_and_ngms(a1111):
    setup_host(a1111)
    a1111.shared.opts.s_min_uncond = 100.0  # NGMS: skip the uncond on every other step
    kwargs = dict(prompt="a fox AND a (dog:1.2)", batch_size=2, n_iter=2, steps=4)
    plain = a1111.txt2img(**kwargs)
    gen = a1111.txt2img(ds(), **kwargs)
    assert a1111.reports == [] and len(gen.processed.images) == 4
    assert all("Delta scale" in t for t in gen.processed.infotexts)
    assert all(not torch.equal(a, b) for a, b in zip(gen.processed.images, plain.processed.images))


def test_inpainting_changes_only_the_masked_area(a1111):
    setup_host(a1111)
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1.0  # inpaint the right half
    plain = a1111.img2img(init, mask=mask, steps=6, denoising_strength=0.8)
    gen = a1111.img2img(init, ds(), mask=mask, steps=6, denoising_strength=0.8)
    assert a1111.reports == []
    a, b = gen.processed.images[0], plain.processed.images[0]
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.equal(a[:, :, 4:], b[:, :, 4:])


def _asgi_post(app, path: str, payload) -> tuple[int | None, bytes, list]:
    """POST `payload` (JSON) through an ASGI app; returns (status, body, bodies the inner app received)."""
    import asyncio
    import json

    body = json.dumps(payload).encode()
    chunks = [body[:7], body[7:]]  # a body that arrives in two messages
    sent, status = [], {}

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]
        else:
            sent.append(message.get("body", b""))

    asyncio.run(app({"type": "http", "method": "POST", "path": path}, receive, send))
    return status.get("code"), b"".join(sent), sent


def test_bad_api_arguments_get_http_422_before_anything_runs(a1111):
    import json

    from lib_deltasampling.webui.api import RequestCheck

    setup_host(a1111)
    seen = []

    async def inner(scope, receive, send):  # stands for A1111's FastAPI app
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = RequestCheck(inner)
    good = {"prompt": "a fox", "alwayson_scripts": {"Delta Sampling": {"args": [{"source_checkpoint": "source.safetensors",
                                                                                   "adapters": "<lora:moxin:1>"}]}}}
    status, body, _ = _asgi_post(app, "/sdapi/v1/txt2img", good)
    assert (status, body) == (200, b"ok") and json.loads(seen[0]) == good  # passed on untouched

    for args, words in [([{"scale": "huge"}], '"Delta scale" (scale)'), ([{"sclae": 1.5}], "sclae"),
                        ([{"source_checkpoint": "nope.safetensors"}], "nope.safetensors"),
                        ([{"source_checkpoint": "source.safetensors", "adapters": "<lora:ghost:1>"}], "ghost"),
                        ({"scale": 1.5}, "must be a list")]:
        seen.clear()
        status, body, _ = _asgi_post(app, "/sdapi/v1/img2img", {"alwayson_scripts": {"delta sampling": {"args": args}}})
        assert status == 422 and words in json.loads(body)["detail"] and seen == [], (args, body)
    # other routes and requests without Delta Sampling pass straight through
    assert _asgi_post(app, "/sdapi/v1/txt2img", {"prompt": "x"})[0] == 200
    assert _asgi_post(app, "/sdapi/v1/options", {"alwayson_scripts": {"Delta Sampling": {"args": 5}}})[0] == 200


def test_a_scale_grid_runs_from_a_closed_accordion_and_loads_the_source_once(a1111, monkeypatch):
    """X/Y/Z over "Delta scale" with Delta Sampling off in the UI: each cell gets its scale (a cell is a
    shallow copy of p), and the source model is loaded once for the whole grid."""
    from lib_deltasampling.webui import state

    setup_host(a1111)
    loads = []
    original = state.load_model
    monkeypatch.setattr(state, "load_model", lambda *a, **k: (loads.append(a[0]), original(*a, **k))[1])
    runner = a1111.scripts.scripts_txt2img
    plot = next(s for s in runner.selectable_scripts if s.title() == "X/Y/Z plot")
    labels = [o.label for o in plot.current_axis_options]
    p = a1111.processing.StableDiffusionProcessingTxt2Img(prompt="a fox", steps=3, width=64, height=64, seed=1,
                                                         cfg_scale=5.0, sampler_name="Euler")
    p.scripts = runner
    p.script_args = a1111.script_args("txt2img", {TITLE: [{"enabled": False, "source_checkpoint": "source.safetensors",
                                                           "adapters": "<lora:moxin:1>"}]})
    processed = plot.run(p, labels.index("Delta scale"), "0, 1, 2", [], 0, "", [], 0, "", [],
                         True, False, False, False, False, False, False, 0, False)
    assert a1111.reports == []
    texts = [t for t in processed.infotexts if "Steps:" in t]
    assert len(texts) == 3 and "Delta" not in texts[0]  # scale 0 is off: no claim in its cell
    assert "Delta scale: 1.0" in texts[1] and "Delta scale: 2.0" in texts[2]
    assert len(loads) == 1 and our_callbacks(a1111) == 0


@pytest.mark.parametrize("settings, run", [
    (dict(scale=0.0), {}),
    (dict(scale=0.0, hires=True), dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6,
                                       hr_upscaler="Latent")),
    (dict(scale=2.0, start=0.5, end=0.6), dict(steps=4)),          # steps at 0, .25, .5, .75: 0.5 <= .5 < .6 holds one
    (dict(scale=2.0, start=0.3, end=0.45), dict(steps=4)),         # no step in [0.3, 0.45): off
])
def test_a_weight_of_zero_at_every_step_is_off(a1111, monkeypatch, settings, run):
    """Scale 0 (or a window holding no step of any pass) loads nothing, installs nothing, claims nothing,
    and gives the image of Delta Sampling off; unlike off, it frees nothing."""
    from lib_deltasampling.webui import state
    from lib_deltasampling.webui.hooks_cfg import PassHook

    setup_host(a1111)
    applies = settings.get("start") == 0.5
    loads, installs = [], []
    original_load, original_install = state.load_model, PassHook.install
    monkeypatch.setattr(state, "load_model", lambda *a, **k: (loads.append(a[0]), original_load(*a, **k))[1])
    monkeypatch.setattr(PassHook, "install", lambda self: (installs.append(self), original_install(self))[1])
    off = a1111.txt2img({TITLE: [{"enabled": False, "source_checkpoint": "source.safetensors"}]}, **run)
    zero = a1111.txt2img(ds(**settings), **run)
    assert a1111.reports == [] and our_callbacks(a1111) == 0
    if applies:  # the control case: the same check sees a window with a step in it
        assert loads and installs and "Delta scale" in zero.processed.infotexts[0]
        return
    assert loads == [] and installs == [] and state.CACHE.loaded == []
    assert "Delta" not in zero.processed.infotexts[0]
    assert torch.equal(zero.processed.images[0], off.processed.images[0])
    a1111.txt2img(ds())                         # loads the source ...
    a1111.txt2img(ds(**settings), **run)        # ... which scale 0 keeps loaded
    assert len(loads) == 1 and state.CACHE.loaded


@pytest.mark.parametrize("setting, short, freed", [(True, False, True), (False, True, True), (False, False, False)])
def test_models_are_freed_when_the_host_checkpoint_changes(a1111, monkeypatch, setting, short, freed):
    from lib_deltasampling.webui import script, state

    setup_host(a1111)
    a1111.add_checkpoint("other.safetensors", "sd1", seed=9)
    a1111.shared.opts.delta_sampling_free_on_checkpoint_change = setting
    monkeypatch.setattr(script, "memory_short", lambda placement: short)
    a1111.txt2img(ds())
    first = state.CACHE.loaded[0]
    a1111.load_checkpoint("other")
    a1111.txt2img(ds())
    assert (first.released, state.CACHE.loaded[0] is not first) == (freed, freed)


def test_refiner_swaps_the_target_and_the_source_stays(a1111, monkeypatch):
    from lib_deltasampling.runtime.pair import SourcePair

    setup_host(a1111)
    a1111.add_checkpoint("refiner.safetensors", "sd1", seed=9)
    calls = []
    original = SourcePair.denoise
    monkeypatch.setattr(SourcePair, "denoise", lambda self, *a: (calls.append(self.base), original(self, *a))[1])
    refine = dict(refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5, steps=4)
    plain = a1111.txt2img(**refine)
    gen = a1111.txt2img(ds(), **refine)
    assert a1111.reports == [] and "Refiner: refiner" in gen.processed.infotexts[0]
    assert len(calls) == 4 and len({id(m) for m in calls}) == 1      # every step, one source throughout
    assert "Delta scale" in gen.processed.infotexts[0]
    assert not torch.equal(gen.processed.images[0], plain.processed.images[0])


def test_one_console_line_per_generation(a1111, caplog):
    import logging

    setup_host(a1111)
    assert logging.getLogger("delta-sampling").getEffectiveLevel() == logging.INFO   # the default
    a1111.txt2img(ds())                                   # loads the source (its own INFO line)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="delta-sampling"):
        a1111.txt2img(ds(scale=2.5, adapters="<lora:moxin:0.8> ink"), steps=4)
    infos = [r.getMessage() for r in caplog.records if r.name == "delta-sampling" and r.levelno >= logging.INFO]
    assert len(infos) == 1, infos
    line = infos[0]
    for part in ("source source.safetensors", "adapters <lora:moxin:0.8> ink", "scale 2.5", "guidance full",
                 "4 source forwards", " s in the source"):
        assert part in line, (part, line)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="delta-sampling"):
        a1111.txt2img(ds(scale=0.0))
        a1111.txt2img({TITLE: [{"enabled": False}]})
    assert not [r for r in caplog.records if r.name == "delta-sampling" and r.levelno >= logging.INFO]


@pytest.mark.parametrize("host_configured", [False, True])
def test_the_console_line_is_printed_once_whether_or_not_the_host_set_up_logging(a1111, host_configured,
                                                                                monkeypatch, capsys):
    """A1111 1.10 adds a root handler only with SD_WEBUI_LOG_LEVEL (modules/logging_config.py); a
    module-level `logging.warning` (e.g. sd_samplers' scheduler autocorrection) adds basicConfig's."""
    import io
    import logging

    setup_host(a1111)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])             # as A1111 starts (pytest's own are set aside)
    host_stream, our_stream = io.StringIO(), io.StringIO()
    if host_configured:
        root.addHandler(logging.StreamHandler(host_stream))
    logger = logging.getLogger("delta-sampling")
    ours = [h for h in logger.handlers if type(h).__name__ == "ConsoleHandler"]
    assert len(ours) == 1
    monkeypatch.setattr(ours[0], "stream", our_stream)
    a1111.txt2img(ds(), scheduler="Automatic")
    printed = host_stream.getvalue() + our_stream.getvalue() + capsys.readouterr().err
    assert printed.count("Delta Sampling: source source.safetensors") == 1, printed
    assert (our_stream.getvalue() == "") is host_configured

    root.handlers = []                                      # nobody configured logging: ours prints
    logger.info("probe")
    assert our_stream.getvalue().count("probe") == 1 and "probe" not in capsys.readouterr().err


def _sha256_of(path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _kohya_addnet_hash(path) -> str:
    """kohya-ss sd-scripts / sd-webui-additional-networks: sha256 of a .safetensors file's bytes after its header."""
    import hashlib
    import struct
    data = Path(path).read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header:]).hexdigest()


def _count_host_hashing(a1111, monkeypatch) -> list:
    hashed = []
    hashes = a1111.hashes
    full, addnet = hashes.calculate_sha256, hashes.addnet_hash_safetensors
    monkeypatch.setattr(hashes, "calculate_sha256", lambda f: (hashed.append(Path(f).name), full(f))[1])
    monkeypatch.setattr(hashes, "addnet_hash_safetensors", lambda b: (hashed.append(Path(b.name).name), addnet(b))[1])
    from lib_deltasampling.runtime import checkpoint

    def never(*a, **k):
        raise AssertionError("hashed outside the host's cache")
    monkeypatch.setattr(checkpoint, "file_sha256", never)
    monkeypatch.setattr(checkpoint, "addnet_hash", never)
    return hashed


@pytest.mark.parametrize("lora_extension", [True, False])
def test_infotext_hashes_come_from_the_hosts_cache(a1111, monkeypatch, lora_extension):
    from lib_deltasampling.engine.infotext import parse_parameters

    a1111.add_checkpoint("target.safetensors", "sd1", seed=0)
    a1111.add_checkpoint("source.safetensors", "sd1", seed=5)
    a1111.load_checkpoint("target")
    adapter, _ = build_adapter("sd1", "kohya", "lora", factories.checkpoint_tensors("sd1", seed=5))
    save_file(adapter, str(a1111.lora_dir / "moxin.safetensors"))
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py", lora=lora_extension)
    a1111.create_ui()
    hashed = _count_host_hashing(a1111, monkeypatch)
    texts = [a1111.txt2img(ds()).processed.infotexts[0] for _ in range(2)]
    assert a1111.reports == []
    assert hashed == ["source.safetensors", "moxin.safetensors"]  # once each, then from the cache
    source = a1111.ckpt_dir / "source.safetensors"
    for text in texts:
        params = parse_parameters(text)[2]
        assert params["Delta source hash"] == _sha256_of(source)[:10]
        assert params["Delta adapter hashes"] == f"moxin: {_kohya_addnet_hash(a1111.lora_dir / 'moxin.safetensors')[:12]}"
    # A1111 retitles a checkpoint once it knows its hash, as when it hashes it itself
    assert f"source.safetensors [{_sha256_of(source)[:10]}]" in a1111.sd_models.checkpoints_list
    if lora_extension:  # the same value as A1111's own "Lora hashes"
        assert a1111.networks().available_networks["moxin"].shorthash == _kohya_addnet_hash(
            a1111.lora_dir / "moxin.safetensors")[:12]


def test_no_hashing_writes_no_hash_keys(a1111, monkeypatch):
    setup_host(a1111)
    a1111.shared.cmd_opts.no_hashing = True
    hashed = _count_host_hashing(a1111, monkeypatch)
    text = a1111.txt2img(ds()).processed.infotexts[0]
    assert a1111.reports == [] and hashed == [] and "Delta scale: 2.0" in text
    assert "Delta source hash" not in text and "Delta adapter hashes" not in text


@pytest.mark.parametrize("how", ["setting", "--medvram"])
def test_low_vram_moves_text_encoders_and_models_to_the_cpu_between_uses(a1111, monkeypatch, how):
    """Low VRAM: the text encoders go to the device for each pass's encoding and back to the CPU after
    it; the models go to the CPU after the generation and back before the next one uses them. (On
    this CPU-only machine the moves are recorded, and the image must not change.)"""
    from lib_deltasampling.engine.sampler import DeltaSampler
    from lib_deltasampling.runtime.model import SourceModel
    from lib_deltasampling.runtime.placement import Placement
    from lib_deltasampling.webui.state import CACHE, SourceCache

    setup_host(a1111)
    plain = a1111.txt2img(ds(), enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    if how == "setting":
        a1111.shared.opts.set("delta_sampling_low_vram", True)
    else:
        monkeypatch.setattr(a1111.shared.cmd_opts, "medvram", True, raising=False)
    events = []
    text_to, prepare, to = SourceModel.text_to, DeltaSampler.prepare.__func__, SourceModel.to
    monkeypatch.setattr(SourceModel, "text_to", lambda self, d: (events.append(("text", str(d))), text_to(self, d))[1])
    monkeypatch.setattr(SourceModel, "to", lambda self, p: (events.append(("model", str(p.device))), to(self, p))[1])
    offload_all = SourceCache.offload_all
    monkeypatch.setattr(SourceCache, "offload_all", lambda self: (events.append(("offload",)), offload_all(self))[1])
    monkeypatch.setattr(DeltaSampler, "prepare",
                        classmethod(lambda cls, *a, **k: (events.append(("prepare",)), prepare(cls, *a, **k))[1]))
    low = a1111.txt2img(ds(), enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    assert torch.equal(low.processed.images[0], plain.processed.images[0])
    # two passes (first and hires), each: text encoders to the device, encode, text encoders to the CPU
    assert events == [("text", "cpu"), ("prepare",), ("text", "cpu")] * 2 + [("offload",)]  # after the generation
    model = CACHE.loaded[0]
    model.placement = Placement(torch.device("cpu"), torch.float32, torch.float8_e4m3fn)  # "somewhere else"
    events.clear()
    a1111.txt2img(ds())
    assert events[0] == ("model", "cpu"), events  # moved back before use
