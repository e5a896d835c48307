"""Delta Sampling for AUTOMATIC1111 WebUI: the thin entry the WebUI loads.

Everything lives in `lib_deltasampling` (the extension root is on sys.path while scripts load);
this file only wires the WebUI's Script hooks to `lib_deltasampling.webui`.
"""

from modules import script_callbacks, scripts

from lib_deltasampling.webui import script as logic
from lib_deltasampling.webui.setup import register_callbacks

register_callbacks(script_callbacks)


class DeltaSamplingScript(scripts.Script):
    sorting_priority = 15
    section = "accordions"   # beside Hires fix / Refiner
    create_group = False

    def title(self):
        return "Delta Sampling"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return logic.ui(self, is_img2img)

    def process(self, p, *args):
        logic.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        logic.before_sampling(p, *args, **kwargs)

    def postprocess(self, p, processed, *args):
        logic.postprocess(p, processed, *args)
