// Delta Sampling: a small "Δ" button on each LoRA card that adds <lora:NAME:1> to the accordion's
// adaptation text of the same tab (txt2img / img2img). Nothing else; tooltips come from the
// components' `tooltip=` through the WebUI's own hints.js.
//
// Relies only on A1111 1.10's card markup (html/extra-networks-card.html: `.card[data-name]` with a
// `.button-row`) inside the LoRA pane (`#<tab>_lora_pane`), and on this extension's elem_id for the
// adaptation text box (`script_<tab>_delta_sampling_adapters`). If either is missing, it does nothing.

(function() {
    "use strict";

    const TABS = ["txt2img", "img2img"];
    const MARK = "data-delta-sampling";

    function adaptersBox(tab) {
        const root = gradioApp().getElementById(`script_${tab}_delta_sampling_adapters`);
        return root ? root.querySelector("textarea") : null;
    }

    function addTag(tab, name) {
        const box = adaptersBox(tab);
        if (!box) return;
        const tag = `<lora:${name}:1>`;
        const text = box.value.replace(/\s+$/, "");
        box.value = text ? `${text} ${tag}` : tag;
        updateInput(box); // the WebUI's helper: tells gradio the value changed
    }

    function decorate(tab) {
        const pane = gradioApp().getElementById(`${tab}_lora_pane`);
        if (!pane || !adaptersBox(tab)) return;
        for (const card of pane.querySelectorAll(`.card[data-name]:not([${MARK}])`)) {
            card.setAttribute(MARK, "1");
            const row = card.querySelector(".button-row");
            if (!row) continue;
            const button = document.createElement("div");
            button.className = "card-button delta-sampling-add";
            button.textContent = "\u0394";
            button.title = "Add to Delta Sampling's adaptation text";
            button.addEventListener("click", function(event) {
                event.stopPropagation(); // not the card's own click, which edits the prompt
                addTag(tab, card.dataset.name);
            });
            row.appendChild(button);
        }
    }

    let timer = null;
    onUiUpdate(function() {
        clearTimeout(timer); // cards are re-rendered often; look once things settle
        timer = setTimeout(function() {
            for (const tab of TABS) {
                try {
                    decorate(tab);
                } catch (e) {
                    console.warn("Delta Sampling:", e);
                }
            }
        }, 500);
    });
})();
