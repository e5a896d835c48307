"""`<lora:...>` / `<lyco:...>` prompt tags -> which adapters to load, with which weights.

Read as A1111 1.10.1 reads them (`extensions-builtin/Lora/extra_networks_lora.py`, `lyco` is an
alias of `lora` there): `<lora:NAME>` weight 1; `<lora:NAME:W>` text encoder and UNet weight W;
`<lora:NAME:TE:UNET>` separate weights (the text encoder's comes first); named `te=`, `unet=`
override the positional ones. Note the order: the second field is the text-encoder weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import SettingError
from ..names import check_name
from ..text.prompt import ExtraNetworkTag, extract_extra_networks

ADAPTER_NETWORKS = ("lora", "lyco")


@dataclass(frozen=True)
class AdapterRequest:
    name: str
    te_multiplier: float
    unet_multiplier: float
    tag: str  # as typed, for messages


def _weight(tag: str, what: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise SettingError(f"adapter tag {tag}", f"the {what} weight {value!r} is not a number",
                           "Write it as <lora:NAME:0.8> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    return weight


def request_from_tag(tag: ExtraNetworkTag) -> AdapterRequest:
    text = f"<{tag.network}:{':'.join(tag.items)}>"
    if not tag.positional or not tag.positional[0].strip():
        raise SettingError(f"adapter tag {text}", "has no adapter name", "Write it as <lora:NAME:WEIGHT>")
    te = _weight(text, "text encoder", tag.positional[1]) if len(tag.positional) > 1 else 1.0
    te = _weight(text, "text encoder", tag.named["te"]) if "te" in tag.named else te
    unet = _weight(text, "UNet", tag.positional[2]) if len(tag.positional) > 2 else te
    unet = _weight(text, "UNet", tag.named["unet"]) if "unet" in tag.named else unet
    name = tag.positional[0].strip()
    check_name(name, f"adapter tag {text}", "Write the LoRA's name as the LoRA tab lists it, without folder")
    return AdapterRequest(name, te, unet, text)


def adapter_requests(text: str) -> tuple[str, list[AdapterRequest]]:
    """The text without any extra-network tags, and the adapters its lora/lyco tags ask for, in order."""
    rest, tags = extract_extra_networks(text)
    return rest, [request_from_tag(t) for t in tags if t.network in ADAPTER_NETWORKS]  # case-sensitive, as A1111
