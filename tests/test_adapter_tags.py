"""Adapter tags read as A1111 1.10.1's extensions-builtin/Lora/extra_networks_lora.py `activate` reads them:
te = positional[1] (default 1), named te= wins; unet = positional[2] (default: te), named unet= wins."""

from __future__ import annotations

import pytest

from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.adapters.tags import adapter_requests


@pytest.mark.parametrize("text, expected", [
    ("<lora:moxin>", [("moxin", 1.0, 1.0)]),
    ("<lora:moxin:0.8>", [("moxin", 0.8, 0.8)]),
    ("<lora:moxin:0.5:1.2>", [("moxin", 0.5, 1.2)]),                   # te first, then unet
    ("<lora:moxin:unet=0.3>", [("moxin", 1.0, 0.3)]),
    ("<lora:moxin:0.7:te=0.2>", [("moxin", 0.2, 0.2)]),                # unet defaults to the final te
    ("<lora:moxin:0.7:0.9:te=0.1:unet=0.4>", [("moxin", 0.1, 0.4)]),
    ("<lyco:ink:0.6> <lora:a b:1>", [("ink", 0.6, 0.6), ("a b", 1.0, 1.0)]),
    ("<LoRA:x:1>", []),                                                   # A1111 looks networks up case-sensitively
    ("<lora:neg:-1.5>", [("neg", -1.5, -1.5)]),
    ("<hypernet:h:1> <lora:x:1>", [("x", 1.0, 1.0)]),                   # other networks are not adapters
])
def test_weights_as_a1111_reads_them(text, expected):
    _, requests = adapter_requests(text)
    assert [(r.name, r.te_multiplier, r.unet_multiplier) for r in requests] == expected


def test_tags_are_removed_from_the_text():
    rest, requests = adapter_requests("a fox <lora:moxin:0.8>, ink <hypernet:x:1>wash")
    assert rest == "a fox , ink wash" and len(requests) == 1


@pytest.mark.parametrize("text, words", [("<lora:x:abc>", "text encoder weight 'abc'"),
                                         ("<lora:x:1:nan>", "UNet weight 'nan'"),
                                         ("<lora::1>", "has no adapter name")])
def test_bad_tags_name_the_tag(text, words):
    with pytest.raises(SettingError) as e:
        adapter_requests(text)
    assert words in str(e.value) and "adapter tag <lora:" in str(e.value)
