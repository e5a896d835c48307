"""Mirrors modules/sd_samplers.py: `all_samplers` (k-diffusion first, then timesteps),
`all_samplers_map`, `samplers`, `samplers_for_img2img`, `samplers_map` (lower-cased names and
aliases), `find_sampler_config(name)` (None -> the first sampler), `create_sampler(name, model)`
(sets `sampler.config`), `get_sampler_and_scheduler`, `fix_p_invalid_sampler_and_scheduler`."""

from __future__ import annotations

import logging

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps, sd_schedulers, shared

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map = {}
for _s in all_samplers:
    samplers_map[_s.name.lower()] = _s.name
    for _alias in _s.aliases:
        samplers_map[_alias.lower()] = _s.name


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in shared.opts.hide_samplers]


def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
    default_sampler = samplers[0]
    found_scheduler = sd_schedulers.schedulers_map.get(scheduler_name, sd_schedulers.schedulers[0])
    name = sampler_name or default_sampler.name
    for scheduler in sd_schedulers.schedulers:
        for name_option in [scheduler.label, scheduler.name, *(scheduler.aliases or [])]:
            if name.endswith(" " + name_option):
                found_scheduler = scheduler
                name = name[0:-(len(name_option) + 1)]
                break
    sampler = all_samplers_map.get(name, default_sampler)
    if convert_automatic and sampler.options.get('scheduler', None) == found_scheduler.name:
        found_scheduler = sd_schedulers.schedulers[0]
    return sampler.name, found_scheduler.label


def fix_p_invalid_sampler_and_scheduler(p):
    i_sampler_name, i_scheduler = p.sampler_name, p.scheduler
    p.sampler_name, p.scheduler = get_sampler_and_scheduler(p.sampler_name, p.scheduler, convert_automatic=False)
    if p.sampler_name != i_sampler_name or i_scheduler != p.scheduler:
        logging.warning(f'Sampler Scheduler autocorrection: "{i_sampler_name}" -> "{p.sampler_name}", "{i_scheduler}" -> "{p.scheduler}"')
