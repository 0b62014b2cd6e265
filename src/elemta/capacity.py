"""Capacity checks of `elemta check-config`: the config against the machine it runs on.

config.warnings() judges a config by itself; the checks here need the machine (RAM, the memory
limit of the cgroup and of elemta.service), so they live apart from config.py. The machine is
read once (`read_machine`, I/O) and judged by pure functions (`warnings`, `explain`) that tests
call with any Machine. The effective limit is the governor's own `effective()` on a real
Sample, so check-config and the daemon cannot disagree about which limit binds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from .config import SESSION_BUFFERS, Config
from .memory.governor import REFRESH_AFTER, Effective, effective
from .memory.sampler import Sample, Sampler
from .memory.snapshot import LimitSource, TermFigures
from .runtime import worker_count
from .units import format_size

# The guide's "Plan Capacity: physical RAM > max_memory_usage * 1.5".
RAM_FACTOR = 1.5
# Measured: one process received 244 one-MiB messages/s on the 2-CPU test VM (README, make
# bench); the fastest a burst can arrive, per worker process.
INGEST_BYTES_PER_SECOND = 244 * 1024 * 1024
# Measured by bench/governor.py: crossing 90% to the first 452 greeting (target < 250 ms).
REACTION_SECONDS = 0.25

UNIT = "elemta.service"


@dataclass(frozen=True)
class Machine:
    ram: int  # MemTotal
    cgroup_limit: int | None  # lowest memory limit of the current cgroup up to the root
    cgroup_source: LimitSource | None  # cgroup-v1 / cgroup-v2
    unit_limit: int | None  # MemoryMax= of elemta.service as systemd has it (None: no limit)


def _systemd_unit_limit() -> int | None:
    """MemoryMax= of elemta.service from a running systemd; None without systemd or limit."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not os.path.isdir("/run/systemd/system"):
        return None
    try:
        out = subprocess.run([systemctl, "show", "--property=MemoryMax", "--value", UNIT],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return int(value) if out.returncode == 0 and value.isdigit() else None


def read_machine() -> tuple[Machine, Sample]:
    """The machine as the daemon's sampler sees it from this process's cgroup."""
    sampler = Sampler()
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    cg = sample.cgroup
    source = None
    if cg is not None and cg.limit is not None:
        source = LimitSource.CGROUP_V2 if cg.version == 2 else LimitSource.CGROUP_V1
    machine = Machine(ram=sample.host_total,
                      cgroup_limit=cg.limit if cg is not None and source is not None else None,
                      cgroup_source=source, unit_limit=_systemd_unit_limit())
    return machine, sample


def effective_limit(cfg: Config, machine: Machine) -> tuple[int, str]:
    """The lowest of max_memory_usage, the unit's and the cgroup's limit and RAM, named."""
    candidates = [(cfg.memory.max_memory_usage, "[memory] max_memory_usage")]
    if machine.unit_limit is not None:
        candidates.append((machine.unit_limit, f"{UNIT} MemoryMax="))
    if machine.cgroup_limit is not None and machine.cgroup_source is not None:
        candidates.append((machine.cgroup_limit,
                           f"the current cgroup's limit ({machine.cgroup_source.value})"))
    candidates.append((machine.ram, "physical RAM"))
    return min(candidates, key=lambda c: c[0])


def warnings(cfg: Config, machine: Machine) -> list[str]:
    """Capacity warnings for `cfg` on `machine`, one line each naming the keys."""
    m, s = cfg.memory, cfg.server
    out = []
    if machine.ram < RAM_FACTOR * m.max_memory_usage:
        out.append(
            f"{cfg.source}: [memory] max_memory_usage ({m.max_memory_usage}, "
            f"{format_size(m.max_memory_usage)}) x {RAM_FACTOR} exceeds this machine's RAM "
            f"({format_size(machine.ram)}): leave the kernel, page cache and other services room"
        )
    limits = [(machine.unit_limit, f"{UNIT} MemoryMax=")]
    if machine.cgroup_source is not None:
        limits.append((machine.cgroup_limit,
                       f"the current cgroup's memory limit ({machine.cgroup_source.value})"))
    for limit, what in limits:
        if limit is not None and limit < m.max_memory_usage:
            binding = "it binds" if effective_limit(cfg, machine)[0] == limit else \
                f"{effective_limit(cfg, machine)[1]} binds, lower still"
            out.append(
                f"{cfg.source}: {what} ({limit}, {format_size(limit)}) is below [memory] "
                f"max_memory_usage ({m.max_memory_usage}): the governor uses the lower one "
                f"({binding}); set max_memory_usage to at most {limit}"
            )
    limit, what = effective_limit(cfg, machine)
    reaction = reaction_window(cfg, limit)
    if reaction is not None:
        out.append(
            f"{cfg.source}: [memory] monitoring_interval ({m.monitoring_interval:g}s) is longer than "
            f"the {reaction:.2f}s a burst needs to go from memory_warning_threshold "
            f"({m.memory_warning_threshold}) to the limit ({format_size(limit)}, {what}) when "
            f"[server] max_connections ({s.max_connections}) sessions hold their buffers: "
            + (f"lower monitoring_interval to {reaction - REACTION_SECONDS:.2f}s or less"
               if reaction > REACTION_SECONDS + 0.01 else
               "no interval is short enough; lower max_connections to "
               f"{fitting_sessions(cfg, limit)} (whose buffers fit) or raise the limit")
        )
    return out


def fitting_sessions(cfg: Config, limit: int) -> int:
    """Sessions whose DATA buffers fit between the warning threshold and `limit`."""
    return max(1, int((1 - cfg.memory.memory_warning_threshold) * limit // SESSION_BUFFERS))


def reaction_window(cfg: Config, limit: int) -> float | None:
    """Seconds a burst needs from the warning threshold to `limit`, when the monitor (every
    monitoring_interval, forced GC and the circuit breaker) is slower than that; else None.

    New work is refused within REACTION_SECONDS whatever the interval (admission questions
    re-sample every REFRESH_AFTER). What admissions cannot stop is sessions already in DATA
    filling their buffers (max_connections x SESSION_BUFFERS): when that fits between the
    warning threshold and the limit, no interval is too long. Otherwise it arrives at most at
    the measured ingest rate per worker."""
    m = cfg.memory
    headroom = (1 - m.memory_warning_threshold) * limit
    if cfg.server.max_connections <= fitting_sessions(cfg, limit):
        return None
    window = headroom / (INGEST_BYTES_PER_SECOND * worker_count(cfg.server))
    return window if m.monitoring_interval + REACTION_SECONDS > window else None


def explain(cfg: Config, machine: Machine, sample: Sample) -> list[str]:
    """What `check-config --explain` prints: the limit the daemon would use here, and why."""
    m, s = cfg.memory, cfg.server
    eff: Effective = effective(sample, m.max_memory_usage)
    binding = eff.binding
    lines = [
        f"effective memory limit: {eff.limit} bytes ({format_size(eff.limit)}), source "
        f"{eff.source.value} (the lowest of [memory] max_memory_usage {format_size(m.max_memory_usage)}"
        + (f", cgroup {format_size(machine.cgroup_limit)}" if machine.cgroup_limit else "")
        + f", RAM {format_size(machine.ram)})",
    ]
    if machine.unit_limit is not None:
        lines.append(f"{UNIT} MemoryMax=: {format_size(machine.unit_limit)} (applies when "
                     "the daemon runs under systemd; this command runs outside its cgroup)")
    for t in eff.terms:
        mark = " (binds: decides the state)" if t == binding else ""
        lines.append(f"term {t.term.value}: {format_size(t.usage)} of {format_size(t.ceiling)}"
                     f" = {t.percent}%{mark}")
    lines.append(
        f"thresholds: warning {m.memory_warning_threshold:g}, gc {m.gc_threshold:g}, critical "
        f"{m.memory_critical_threshold:g} of each term's ceiling")
    # The term with the least room before its critical threshold is the one a burst hits first.
    def room(t: TermFigures) -> int:
        return int(m.memory_critical_threshold * t.ceiling) - t.usage

    first = min(eff.terms, key=room)
    lines.append(
        f"headroom: {format_size(max(0, room(first)))} before term {first.term.value} reaches the "
        f"critical threshold ({format_size(int(m.memory_critical_threshold * first.ceiling))}: "
        f"new work gets 452 4.3.1), {format_size(max(0, first.ceiling - first.usage))} before its "
        "ceiling (the process term counts this command's own memory; the daemon's is in "
        "`elemta stats`)")
    worst = m.per_connection_memory_limit * s.max_connections
    lines.append(
        f"worst case: {s.max_connections} sessions x per_connection_memory_limit "
        f"{format_size(m.per_connection_memory_limit)} = {format_size(worst)}"
        + (f", {worst / eff.limit:.1f} x the limit: the governor refuses new connections and "
           "MAIL/RCPT at the critical threshold and 552s a session past its own limit, so "
           "this is not reached" if worst > eff.limit else ", within the limit"))
    lines.append(
        f"buffers: {s.max_connections} sessions in DATA hold about "
        f"{format_size(s.max_connections * SESSION_BUFFERS)} by elemta's own choice; the monitor "
        f"runs every {m.monitoring_interval:g}s, admission questions re-sample every "
        f"{REFRESH_AFTER * 1000:.0f} ms")
    return lines
