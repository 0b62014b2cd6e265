"""`[server] workers = "auto"`: how many worker processes, from CPUs and the memory budget.

A pure decision (no I/O): runtime.worker_plan gathers the inputs (affinity, cgroup CPU quota, the
governor's effective memory limit) and logs the result. The rule:

    usable CPUs = min(CPUs in the affinity mask, ceil(cgroup CPU quota)), at least 1
    memory cap  = floor(MEMORY_SHARE x memory limit / WORKER_BASELINE), at least 1
    workers     = min(usable CPUs, memory cap, MAX_WORKERS)

so that on a 64-CPU host with the default 2 GiB budget elemta starts 17 workers, not 64 whose
baseline alone would take most of the budget before any mail arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .units import format_size

MiB = 1024 * 1024
# One worker's resident memory after it has received mail (2,000 x 10 KiB and 100 x 1 MiB
# messages, workers = 2, Python 3.11, measured with /proc/PID/smaps_rollup): RSS 29-30 MiB, of
# which 11-12 MiB private dirty (the rest is shared with the supervisor and its siblings, so
# its PSS was 16-17 MiB). RSS is the upper bound of what each further worker can cost.
WORKER_BASELINE = 30 * MiB
# The workers' baseline may take at most this share of the memory limit: the rest is for the
# sessions and their messages, which the governor's thresholds (75% / 90%) are about.
MEMORY_SHARE = 0.25
MAX_WORKERS = 64  # [server] workers accepts 1..64


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    usable_cpus: int
    memory_cap: int
    binding: str  # what decided: "cpus", "memory", "maximum", or "configured" (a number)
    cpus: int  # CPUs in the affinity mask
    quota: float | None  # the cgroup's CPU quota in CPUs (None: no quota)
    limit: int  # the memory limit (bytes) the cap was computed from
    baseline: int

    def describe(self) -> str:
        """The start-up line's figures: "2 (2 usable CPUs; memory cap 17)"."""
        if self.binding == "configured":
            return f"{self.count} ([server] workers = {self.count})"
        cpus = "CPU" if self.usable_cpus == 1 else "CPUs"
        return f"{self.count} ({self.usable_cpus} usable {cpus}; memory cap {self.memory_cap})"

    def explain(self) -> str:
        """Every input, for check-config --explain and the start-up log."""
        if self.binding == "configured":
            return f"[server] workers = {self.count} (not \"auto\")"
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return (f"usable CPUs {self.usable_cpus} = min(affinity {self.cpus}, cgroup quota "
                f"{quota} rounded up); memory cap {self.memory_cap} = {MEMORY_SHARE:.0%} of "
                f"the memory limit {format_size(self.limit)} / {format_size(self.baseline)} "
                f"per worker; at most {MAX_WORKERS}; {self.binding} binds")


def plan_workers(cpus: int, quota: float | None, limit: int, baseline: int = WORKER_BASELINE,
                 share: float = MEMORY_SHARE, maximum: int = MAX_WORKERS) -> WorkerPlan:
    """How many workers "auto" starts; see the module's rule."""
    if cpus < 1 or baseline < 1 or limit < 1:
        raise ValueError(f"cpus, limit and baseline must be positive: {cpus}, {limit}, "
                         f"{baseline}")
    usable = cpus if quota is None else min(cpus, math.ceil(quota))
    usable = max(1, usable)
    cap = max(1, int(share * limit // baseline))
    count = min(usable, cap, maximum)
    binding = ("maximum" if maximum < min(usable, cap)
               else "cpus" if usable <= cap else "memory")
    return WorkerPlan(count=count, usable_cpus=usable, memory_cap=cap, binding=binding,
                      cpus=cpus, quota=quota, limit=limit, baseline=baseline)


def configured_plan(count: int) -> WorkerPlan:
    """[server] workers = N: no decision to make."""
    return WorkerPlan(count=count, usable_cpus=0, memory_cap=0, binding="configured", cpus=0,
                      quota=None, limit=0, baseline=0)
