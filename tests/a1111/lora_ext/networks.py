"""Stand-in for A1111 1.10.1 extensions-builtin/Lora/networks.py (top-level module `networks`,
in sys.modules once the Lora extension's script imported it): `available_networks` (file stem ->
NetworkOnDisk; duplicates overwrite), `available_network_aliases` (name and alias),
`forbidden_network_aliases` (ambiguous aliases + "none", "Addams"), `available_network_hash_lookup`,
`loaded_networks`, `list_available_networks()` (rescan of --lora-dir and --lyco-dir-backcompat,
.pt/.ckpt/.safetensors, natural order), `infotext_pasted`. The `ExtraNetworkLora` here only
records what `<lora:...>` tags it was activated with (`activations`); nothing is patched."""

from __future__ import annotations

import os
import re

import network
from modules import errors, extra_networks, shared

available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}
activations: list[list[extra_networks.ExtraNetworkParams]] = []


def _natural_key(s):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', s)]


def _walk(path):
    if not os.path.exists(path):
        return []
    out = []
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda x: _natural_key(x[0])):
        out += [os.path.join(root, f) for f in sorted(files, key=_natural_key)
                if os.path.splitext(f)[1].lower() in (".pt", ".ckpt", ".safetensors")]
    return out


def process_network_files(names=None):
    candidates = _walk(shared.cmd_opts.lora_dir) + _walk(shared.cmd_opts.lyco_dir_backcompat)
    for filename in candidates:
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


def infotext_pasted(infotext, params):
    pass   # (AddNet field conversion; not modelled)


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')

    def activate(self, p, params_list):
        activations.append(list(params_list))

    def deactivate(self, p):
        pass


extra_network_lora = None
