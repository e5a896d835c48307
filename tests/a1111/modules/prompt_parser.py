"""Mirrors modules/prompt_parser.py (1.10.1): the conditioning containers and how the CFG
denoiser reads them.

- `SdConditioning(prompts, is_negative_prompt, width, height, copy_from)` (a list of prompts).
- `get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps, use_old_scheduling)`:
  A1111's lark grammar is not available; the schedule comes from the project's own
  re-implementation `runtime.text.prompt.prompt_schedules`, which is tested against A1111's
  tables elsewhere (stated here because it is the one piece not rewritten for the stand-in).
- `get_learned_conditioning(model, prompts, steps, ...)` -> per prompt a list of
  `ScheduledPromptConditioning(end_at_step, cond)` (cond: [77k, dim] or {'crossattn','vector'}).
- `get_multicond_prompt_list(prompts)`: split on `\\bAND\\b`, optional `:weight`, identical
  sub-prompt texts share one flat entry; `get_multicond_learned_conditioning` ->
  `MulticondLearnedConditioning(shape=(len(prompts),), batch=[[ComposableScheduledPromptConditioning]])`.
- `reconstruct_cond_batch(c, step)` ([B, 77k, dim] or `DictWithShape`) and
  `reconstruct_multicond_batch(c, step)` -> (conds_list, tensor): ONE ROW PER (image, sub-prompt)
  in image order, conds_list[i] = [(row, weight), ...]; `stack_conds` pads shorter conds by
  repeating their last vector.
- `parse_prompt_attention` (lists of [text, weight], as A1111).
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

from lib_deltasampling.runtime.text import prompt as _project_prompt


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    cache = {p: [[t, text] for t, text in _project_prompt.prompt_schedules(p, base_steps, hires_steps=hires_steps,
                                                                          use_old_scheduling=use_old_scheduling)]
             for p in set(prompts)}
    return [cache[p] for p in prompts]


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res = []
    prompt_schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache = {}
    for prompt, prompt_schedule in zip(prompts, prompt_schedules):
        cached = cache.get(prompt, None)
        if cached is not None:
            res.append(cached)
            continue
        texts = SdConditioning([x[1] for x in prompt_schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        cond_schedule = []
        for i, (end_at_step, _) in enumerate(prompt_schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            cond_schedule.append(ScheduledPromptConditioning(end_at_step, cond))
        cache[prompt] = cond_schedule
        res.append(cond_schedule)
    return res


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    res_indexes = []
    prompt_indexes = {}
    prompt_flat_list = SdConditioning(prompts)
    prompt_flat_list.clear()

    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text, None)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    res = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=res)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _scheduled_index(schedules, current_step):
    for i, entry in enumerate(schedules):
        if current_step <= entry.end_at_step:
            return i
    return 0


def reconstruct_cond_batch(c, current_step):
    param = c[0][0].cond
    is_dict = isinstance(param, dict)
    if is_dict:
        res = {k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in param.items()}
        res = DictWithShape(res, (len(c),) + param['crossattn'].shape)
    else:
        res = torch.zeros((len(c),) + param.shape, device=param.device, dtype=param.dtype)
    for i, cond_schedule in enumerate(c):
        chosen = cond_schedule[_scheduled_index(cond_schedule, current_step)].cond
        if is_dict:
            for k, v in chosen.items():
                res[k][i] = v
        else:
            res[i] = chosen
    return res


def stack_conds(tensors):
    token_count = max(x.shape[0] for x in tensors)
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last_vector = tensors[i][-1:]
            tensors[i] = torch.vstack([tensors[i], last_vector.repeat([token_count - tensors[i].shape[0], 1])])
    return torch.stack(tensors)


def reconstruct_multicond_batch(c, current_step):
    param = c.batch[0][0].schedules[0].cond
    tensors = []
    conds_list = []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable_prompt in composable_prompts:
            index = _scheduled_index(composable_prompt.schedules, current_step)
            conds_for_batch.append((len(tensors), composable_prompt.weight))
            tensors.append(composable_prompt.schedules[index].cond)
        conds_list.append(conds_for_batch)

    if isinstance(tensors[0], dict):
        keys = list(tensors[0].keys())
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in keys}
        stacked = DictWithShape(stacked, stacked['crossattn'].shape)
    else:
        stacked = stack_conds(tensors).to(device=param.device, dtype=param.dtype)
    return conds_list, stacked


def parse_prompt_attention(text):
    return [[t, w] for t, w in _project_prompt.parse_prompt_attention(text)]
