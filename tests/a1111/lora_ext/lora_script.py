"""Stand-in for extensions-builtin/Lora/scripts/lora_script.py: imports `network`/`networks`
(so they sit in sys.modules), registers the "lora" extra network (alias "lyco") in before_ui,
the infotext_pasted callback, the `lora_preferred_name` setting, and lists the networks."""

import gradio as gr  # noqa: F401

import networks
from modules import extra_networks, script_callbacks, shared


def before_ui():
    networks.extra_network_lora = networks.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


script_callbacks.on_before_ui(before_ui)
script_callbacks.on_infotext_pasted(networks.infotext_pasted)

shared.options_templates.update(shared.options_section(('extra_networks', "Extra Networks"), {
    "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
}))

networks.list_available_networks()
