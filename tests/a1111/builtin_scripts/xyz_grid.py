"""Stand-in for A1111 1.10.1 scripts/xyz_grid.py (a root script: loaded by path as module
"xyz_grid.py", found by extensions through `scripts.scripts_data`, not via sys.modules):

    xyz = next(x.module for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py")

Mirrors: `AxisOption(label, type, apply, format_value=format_value_add_label, confirm=None,
cost=0.0, choices=None, prepare=None)`, `AxisOptionImg2Img` / `AxisOptionTxt2Img` (is_img2img),
`apply_field`, `apply_override(field, boolean=False)`, `boolean_choice(reverse)`,
`format_value`, `format_value_add_label`, `format_value_join_list`, `format_nothing`,
`format_remove_path`, `do_nothing`, `str_permutations`, `list_to_csv_string`,
`csv_string_to_list_strip`, the range regexes, `axis_options` (a subset of the built-in
axes, same order), and `Script`: `ui()` snapshots `current_axis_options` from `axis_options`
(so axes must be registered before the UI is built), `run(p, x_type, x_values,
x_values_dropdown, y_type, ..., csv_mode)` = `process_axis` (ranges, final `opt.type(x)` cast,
confirm) and one `process_images(copy(p))` per cell with the x, y, z `apply` calls, cells
visited in the cost order of `draw_xyz_grid`. No grid image is drawn: the returned Processed
has one entry per cell (index ix + iy * len(xs) + iz * len(xs) * len(ys)) in `images`,
`infotexts`, and `cells` = [(ix, iy, iz, Processed)] in visiting order (stand-in addition).
"""

from collections import namedtuple
from copy import copy
from itertools import chain, permutations
from io import StringIO
import csv
import os.path
import re

import numpy as np

import gradio as gr
import modules.scripts as scripts
from modules import errors, sd_models, sd_samplers, sd_schedulers
from modules.processing import Processed, fix_seed, process_images
from modules.shared import opts, state

AxisInfo = namedtuple('AxisInfo', ['axis', 'values'])


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def apply_prompt(p, x, xs):
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def confirm_samplers(p, xs):
    for x in xs:
        if x.lower() not in sd_samplers.samplers_map:
            raise RuntimeError(f"Unknown sampler: {x}")


def apply_checkpoint(p, x, xs):
    info = sd_models.get_closet_checkpoint_match(x)
    if info is None:
        raise RuntimeError(f"Unknown checkpoint: {x}")
    p.override_settings['sd_model_checkpoint'] = info.name


def confirm_checkpoints(p, xs):
    for x in xs:
        if sd_models.get_closet_checkpoint_match(x) is None:
            raise RuntimeError(f"Unknown checkpoint: {x}")


def confirm_checkpoints_or_none(p, xs):
    for x in xs:
        if x in (None, "", "None", "none"):
            continue
        if sd_models.get_closet_checkpoint_match(x) is None:
            raise RuntimeError(f"Unknown checkpoint: {x}")


def apply_override(field, boolean: bool = False):
    def fun(p, x, xs):
        if boolean:
            x = True if x.lower() == "true" else False
        p.override_settings[field] = x
    return fun


def boolean_choice(reverse: bool = False):
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]
    return choice


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_value(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return x


def format_value_join_list(p, opt, x):
    return ", ".join(x)


def do_nothing(p, x, xs):
    pass


def format_nothing(p, opt, x):
    return ""


def format_remove_path(p, opt, x):
    return os.path.basename(x)


def str_permutations(x):
    """dummy function for specifying it in AxisOption's type when you want to get a list of permutations"""
    return x


def list_to_csv_string(data_list):
    with StringIO() as o:
        csv.writer(o).writerow(data_list)
        return o.getvalue().strip()


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Var. seed", int, apply_field("subseed")),
    AxisOption("Var. strength", float, apply_field("subseed_strength")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
    AxisOption("Prompt S/R", str, apply_prompt, format_value=format_value),
    AxisOptionTxt2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value, confirm=confirm_samplers, choices=lambda: [x.name for x in sd_samplers.samplers if x.name not in opts.hide_samplers]),
    AxisOptionTxt2Img("Hires sampler", str, apply_field("hr_sampler_name"), confirm=confirm_samplers, choices=lambda: [x.name for x in sd_samplers.samplers_for_img2img if x.name not in opts.hide_samplers]),
    AxisOptionImg2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value, confirm=confirm_samplers, choices=lambda: [x.name for x in sd_samplers.samplers_for_img2img if x.name not in opts.hide_samplers]),
    AxisOption("Checkpoint name", str, apply_checkpoint, format_value=format_remove_path, confirm=confirm_checkpoints, cost=1.0, choices=lambda: sorted(sd_models.checkpoints_list, key=str.casefold)),
    AxisOption("Negative Guidance minimum sigma", float, apply_field("s_min_uncond")),
    AxisOption("Schedule type", str, apply_field("scheduler"), choices=lambda: [x.label for x in sd_schedulers.schedulers]),
    AxisOption("Eta", float, apply_field("eta")),
    AxisOption("Clip skip", int, apply_override('CLIP_stop_at_last_layers')),
    AxisOption("Denoising", float, apply_field("denoising_strength")),
    AxisOption("Initial noise multiplier", float, apply_field("initial_noise_multiplier")),
    AxisOption("Always discard next-to-last sigma", str, apply_override('always_discard_next_to_last_sigma', boolean=True), choices=boolean_choice(reverse=True)),
    AxisOption("SGM noise multiplier", str, apply_override('sgm_noise_multiplier', boolean=True), choices=boolean_choice(reverse=True)),
    AxisOption("Refiner checkpoint", str, apply_field('refiner_checkpoint'), format_value=format_remove_path, confirm=confirm_checkpoints_or_none, cost=1.0, choices=lambda: ['None'] + sorted(sd_models.checkpoints_list, key=str.casefold)),
    AxisOption("Refiner switch at", float, apply_field('refiner_switch_at')),
]

re_range = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
re_range_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
re_range_count = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
re_range_count_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def _expand_ranges(valslist, to_number, regex, regex_count, is_int):
    out = []
    for val in valslist:
        if val.strip() == '':
            continue
        m, mc = regex.fullmatch(val), regex_count.fullmatch(val)
        if m is not None:
            start, end = to_number(m.group(1)), to_number(m.group(2))
            step = to_number(m.group(3)) if m.group(3) is not None else 1
            out += list(range(start, end + 1, step)) if is_int else np.arange(start, end + step, step).tolist()
        elif mc is not None:
            start, end = to_number(mc.group(1)), to_number(mc.group(2))
            num = int(mc.group(3)) if mc.group(3) is not None else 1
            values = np.linspace(start=start, stop=end, num=num).tolist()
            out += [int(x) for x in values] if is_int else values
        else:
            out.append(val)
    return out


def _cell_order(x_opt, y_opt, z_opt):
    """draw_xyz_grid's nesting: the costliest axis outermost (ties: z, then y outer)."""
    first, second = 'z', 'y'
    if x_opt.cost > y_opt.cost and x_opt.cost > z_opt.cost:
        first, second = 'x', ('y' if y_opt.cost > z_opt.cost else 'z')
    elif y_opt.cost > x_opt.cost and y_opt.cost > z_opt.cost:
        first, second = 'y', ('x' if x_opt.cost > z_opt.cost else 'z')
    elif z_opt.cost > x_opt.cost and z_opt.cost > y_opt.cost:
        first, second = 'z', ('x' if x_opt.cost > y_opt.cost else 'y')
    third = ({'x', 'y', 'z'} - {first, second}).pop()
    return first, second, third


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]
        labels = [x.label for x in self.current_axis_options]
        with gr.Row():
            x_type = gr.Dropdown(label="X type", choices=labels, value=labels[1], type="index", elem_id=self.elem_id("x_type"))
            x_values = gr.Textbox(label="X values", lines=1, elem_id=self.elem_id("x_values"))
            x_values_dropdown = gr.Dropdown(label="X values", visible=False, multiselect=True, interactive=True)
            y_type = gr.Dropdown(label="Y type", choices=labels, value=labels[0], type="index", elem_id=self.elem_id("y_type"))
            y_values = gr.Textbox(label="Y values", lines=1, elem_id=self.elem_id("y_values"))
            y_values_dropdown = gr.Dropdown(label="Y values", visible=False, multiselect=True, interactive=True)
            z_type = gr.Dropdown(label="Z type", choices=labels, value=labels[0], type="index", elem_id=self.elem_id("z_type"))
            z_values = gr.Textbox(label="Z values", lines=1, elem_id=self.elem_id("z_values"))
            z_values_dropdown = gr.Dropdown(label="Z values", visible=False, multiselect=True, interactive=True)
        draw_legend = gr.Checkbox(label='Draw legend', value=True, elem_id=self.elem_id("draw_legend"))
        no_fixed_seeds = gr.Checkbox(label='Keep -1 for seeds', value=False, elem_id=self.elem_id("no_fixed_seeds"))
        vary_seeds_x = gr.Checkbox(label='Vary seeds for X', value=False, elem_id=self.elem_id("vary_seeds_x"))
        vary_seeds_y = gr.Checkbox(label='Vary seeds for Y', value=False, elem_id=self.elem_id("vary_seeds_y"))
        vary_seeds_z = gr.Checkbox(label='Vary seeds for Z', value=False, elem_id=self.elem_id("vary_seeds_z"))
        include_lone_images = gr.Checkbox(label='Include Sub Images', value=False, elem_id=self.elem_id("include_lone_images"))
        include_sub_grids = gr.Checkbox(label='Include Sub Grids', value=False, elem_id=self.elem_id("include_sub_grids"))
        csv_mode = gr.Checkbox(label='Use text inputs instead of dropdowns', value=False, elem_id=self.elem_id("csv_mode"))
        margin_size = gr.Slider(label="Grid margins (px)", minimum=0, maximum=500, value=0, step=2, elem_id=self.elem_id("margin_size"))
        return [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
                z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
                vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
            z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x,
            vary_seeds_y, vary_seeds_z, margin_size, csv_mode):
        x_type, y_type, z_type = x_type or 0, y_type or 0, z_type or 0

        if not no_fixed_seeds:
            fix_seed(p)
        if not opts.return_grid:
            p.batch_size = 1

        def process_axis(opt, vals, vals_dropdown):
            if opt.label == 'Nothing':
                return [0]
            if opt.choices is not None and not csv_mode:
                valslist = vals_dropdown
            elif opt.prepare is not None:
                valslist = opt.prepare(vals)
            else:
                valslist = csv_string_to_list_strip(vals)
            if opt.type == int:
                valslist = _expand_ranges(valslist, int, re_range, re_range_count, True)
            elif opt.type == float:
                valslist = _expand_ranges(valslist, float, re_range_float, re_range_count_float, False)
            elif opt.type == str_permutations:
                valslist = list(permutations(valslist))
            valslist = [opt.type(x) for x in valslist]
            if opt.confirm:
                opt.confirm(p, valslist)
            return valslist

        axes = []
        for kind, values, dropdown in ((x_type, x_values, x_values_dropdown), (y_type, y_values, y_values_dropdown),
                                       (z_type, z_values, z_values_dropdown)):
            opt = self.current_axis_options[kind]
            if opt.choices is not None and not csv_mode:
                values = list_to_csv_string(dropdown)
            axes.append((opt, values, process_axis(opt, values, dropdown)))
        (x_opt, x_values, xs), (y_opt, y_values, ys), (z_opt, z_values, zs) = axes

        state.xyz_plot_x = AxisInfo(x_opt, xs)
        state.xyz_plot_y = AxisInfo(y_opt, ys)
        state.xyz_plot_z = AxisInfo(z_opt, zs)

        def cell(x, y, z, ix, iy, iz):
            if state.interrupted or state.stopping_generation:
                return Processed(p, [], p.seed, "")
            pc = copy(p)          # shallow: extra_generation_params / override_settings are shared
            pc.styles = pc.styles[:]
            x_opt.apply(pc, x, xs)
            y_opt.apply(pc, y, ys)
            z_opt.apply(pc, z, zs)
            xdim = len(xs) if vary_seeds_x else 1
            ydim = len(ys) if vary_seeds_y else 1
            if vary_seeds_x:
                pc.seed += ix
            if vary_seeds_y:
                pc.seed += iy * xdim
            if vary_seeds_z:
                pc.seed += iz * xdim * ydim
            try:
                return process_images(pc)
            except Exception as e:
                errors.display(e, "generating image for xyz plot")
                return Processed(p, [], p.seed, "")

        values = {'x': xs, 'y': ys, 'z': zs}
        order = _cell_order(x_opt, y_opt, z_opt)
        count = len(xs) * len(ys) * len(zs)
        state.job_count = count * p.n_iter
        result = Processed(p, [None] * count)
        result.infotexts = [None] * count
        result.cells = []
        for i0, v0 in enumerate(values[order[0]]):
            for i1, v1 in enumerate(values[order[1]]):
                for i2, v2 in enumerate(values[order[2]]):
                    idx = {order[0]: (i0, v0), order[1]: (i1, v1), order[2]: (i2, v2)}
                    (ix, x), (iy, y), (iz, z) = idx['x'], idx['y'], idx['z']
                    processed = cell(x, y, z, ix, iy, iz)
                    result.cells.append((ix, iy, iz, processed))
                    index = ix + iy * len(xs) + iz * len(xs) * len(ys)
                    if processed.images:
                        result.images[index] = processed.images[0]
                        result.infotexts[index] = processed.infotexts[0]
        return result

