"""Mirrors modules/sd_schedulers.py: `Scheduler(name, label, function, default_rho,
need_inner_model, aliases)`, `schedulers`, `schedulers_map` (by name and label). The sigma
functions are the project's runner implementations (`runner.sampling`), tested against A1111."""

import dataclasses

from lib_deltasampling.runner import sampling as _rs


@dataclasses.dataclass
class Scheduler:
    name: str
    label: str
    function: object
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: list = None


schedulers = [Scheduler(s.name, s.label, s.function, aliases=list(s.aliases) or None) for s in _rs.SCHEDULES.values()]
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
