"""Stand-in for A1111 1.10.1 extensions-builtin/Lora/network.py (top-level module `network`):
`SdVersion`, `NetworkOnDisk(name, filename)` with `metadata` (safetensors header), `alias`
(ss_output_name or name), `hash`/`shorthash` (sshs_model_hash or the addnet hash from the cache;
12 chars, registered in `networks.available_network_hash_lookup`), `sd_version`, `set_hash`,
`read_hash()` (computes the addnet hash), `get_alias()` (honours opts.lora_preferred_name and
forbidden aliases). Weights are never loaded."""

from __future__ import annotations

import enum
import os

from modules import errors, hashes, sd_models, shared


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if self.is_safetensors:
            try:
                self.metadata = sd_models.read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading lora {filename}")
        self.alias = self.metadata.get('ss_output_name', self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get('sshs_model_hash')
                      or hashes.sha256_from_cache(self.filename, "lora/" + self.name, use_addnet_hash=self.is_safetensors)
                      or '')
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get('ss_base_model_version', "")).startswith("sdxl_"):
            return SdVersion.SDXL
        if str(self.metadata.get('ss_v2', "")) == "True":
            return SdVersion.SD2
        if len(self.metadata):
            return SdVersion.SD1
        return SdVersion.Unknown

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]
        if self.shorthash:
            import networks
            networks.available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        if not self.hash:
            self.set_hash(hashes.sha256(self.filename, "lora/" + self.name, use_addnet_hash=self.is_safetensors) or '')

    def get_alias(self):
        import networks
        if shared.opts.lora_preferred_name == "Filename" or self.alias.lower() in networks.forbidden_network_aliases:
            return self.name
        return self.alias
