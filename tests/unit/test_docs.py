"""The manual pages, the packaged config file and the unit document what the code does."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from elemta import config
from elemta.events import EVENTS
from elemta.units import parse_size

ROOT = Path(__file__).resolve().parents[2]
MAN8 = ROOT / "man/elemta.8"
MAN5 = ROOT / "man/elemta.toml.5"
SERVICE = ROOT / "packaging/systemd/elemta.service"


def sections_of(page: Path) -> dict[str, str]:
    """Text of each .SH section, keyed by its heading."""
    out: dict[str, str] = {}
    name = ""
    for line in page.read_text().splitlines():
        m = re.match(r'\.SH\s+"?([^"]*)"?', line)
        if m:
            name = m.group(1)
            out[name] = ""
        else:
            out[name] = out.get(name, "") + line + "\n"
    return out


def test_every_config_key_is_in_elemta_toml_5_under_its_section() -> None:
    sections = sections_of(MAN5)
    missing = []
    for section, f in config.iter_keys():
        body = next((t for h, t in sections.items() if h.startswith(f"[{section}]")), "")
        if not re.search(rf'^\.BI "{re.escape(f.name)} = "', body, re.M):
            missing.append(f"[{section}] {f.name}")
    assert not missing, f"keys missing from {MAN5.name}: {missing}"


def test_every_default_in_elemta_toml_5_is_the_codes_default() -> None:
    text = MAN5.read_text()
    for section, f in config.iter_keys():
        if f.metadata["kind"] not in ("size", "int", "fraction", "bool"):
            continue
        default = getattr(getattr(config.Config(), section), f.name)
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        m = re.search(rf'^\.BI "{re.escape(f.name)} = ".*?^Default: \\fB([^\\]+)\\fR', text, re.M | re.S)
        assert m is not None and m.group(1) == shown, (section, f.name, m and m.group(1), shown)


def test_every_restart_only_key_is_named_under_sighup_in_elemta_8() -> None:
    from elemta.reload import RESTART_ONLY

    signals = sections_of(MAN8)["SIGNALS"]
    sighup = signals[signals.index(".B SIGHUP"):].split(".TP", 1)[0]
    missing = []
    for section, key in RESTART_ONLY:
        after = sighup.split(f".B [{section}]", 1)
        named = after[1].split("\n.B [", 1)[0] if len(after) == 2 else ""
        if not re.search(rf"(^|[ \"]){re.escape(key)}([ \",;.]|$)", named, re.M):
            missing.append(f"[{section}] {key}")
    assert not missing, f"restart-only keys not named under SIGHUP in {MAN8.name}: {missing}"


def test_every_event_and_message_id_is_in_elemta_8() -> None:
    text = MAN8.read_text()
    for event in EVENTS.values():
        assert re.search(rf"^\.B {event.name}$", text, re.M), event.name
        assert event.message_id in text, event.name
        for field in event.fields:
            assert field.upper() in text, (event.name, field)


def _full_snapshot() -> Any:
    """A snapshot with every optional part present, so every metric family is exported."""
    from elemta.memory.snapshot import (
        BreakerState,
        CgroupFigures,
        LimitSource,
        MemoryState,
        Pressure,
        Snapshot,
    )

    cg = CgroupFigures(2, "/system.slice/elemta.service", 100, 1000, 90, 10,
                       {"low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 0})
    return Snapshot(
        taken_at=1.0, wall_time=1.0, process_rss=50, usage=90, limit=1000,
        limit_source=LimitSource.CGROUP_V2, utilization=0.09, state=MemoryState.NORMAL,
        breaker=BreakerState.CLOSED, protection=True, warning_threshold=0.75, gc_threshold=0.8,
        critical_threshold=0.9, sessions=0, max_sessions=10, session_bytes=0, tasks=1,
        max_tasks=20, gc_runs=0, last_gc_at=None, last_gc_freed=0, host_total=10_000,
        host_available=5_000, cgroup=cg, pressure=Pressure(0.0, 0.0, 0, 0),
    )


def _registry() -> Any:
    """The daemon's registry, built the way the daemon builds it (elemta.observe.metrics)."""
    if importlib.util.find_spec("elemta.observe.metrics") is None:
        pytest.skip("elemta.observe.metrics does not exist yet (observability branch): "
                    "no metric names to check")
    module = importlib.import_module("elemta.observe.metrics")
    factory = getattr(module, "build_registry", None)
    if not callable(factory):
        pytest.skip("elemta.observe.metrics has no build_registry(): teach test_docs to build it")
    # Arguments by name: what each collector reads.
    provide = {
        "snapshot": lambda: _full_snapshot,
        "stats": lambda: module.SmtpStats(),
        "heartbeat_age": lambda: (lambda: 0.0),
        "stall_after": lambda: 5.0,
        "health_status": lambda: (lambda: "ok"),
    }
    params = inspect.signature(factory).parameters
    unknown = [p for p in params if p not in provide]
    if unknown:
        pytest.skip(f"build_registry() takes {unknown}: teach test_docs what to pass")
    return factory(**{p: provide[p]() for p in params})


def test_every_metric_registered_in_the_code_is_in_elemta_8() -> None:
    registry = _registry()
    text = MAN8.read_text()
    missing = []
    for family in registry.collect():
        if not family.name.startswith("elemta_"):
            continue  # prometheus_client's process_* and python_gc_* are documented as families
        names = {family.name, family.name + "_total"} if family.type == "counter" else {family.name}
        if not any(re.search(rf"\b{re.escape(n)}\b", text) for n in names):
            missing.append(family.name)
    assert not missing, f"metrics missing from elemta.8: {missing}"


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_man_pages_render_without_warnings(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    out = subprocess.run(["groff", "-ww", "-z", "-man", str(page)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def _conffile() -> str:
    spec = importlib.util.spec_from_file_location("gen_conffile", ROOT / "packaging/gen-conffile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.render()
    return text


def test_packaged_conffile_has_every_key_and_only_the_package_values_differ(tmp_path: Path) -> None:
    text = _conffile()
    for section, f in config.iter_keys():
        assert re.search(rf"^#?{re.escape(f.name)} = ", text, re.M), f"[{section}] {f.name}"
    uncommented = "\n".join(re.sub(r"^#(\w+ = )", r"\1", line) for line in text.splitlines())
    tomllib.loads(uncommented)  # every commented default is valid TOML
    path = tmp_path / "elemta.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.delivery.maildir_root == "/var/lib/elemta/mail"
    assert cfg.delivery.recipients == "maildir"  # unknown local users refused, as Postfix does
    assert [str(a) for a in cfg.server.listen] == ["127.0.0.1:25"]
    assert cfg.memory == config.MemoryConfig()


def test_unit_memory_settings_match_the_default_budget() -> None:
    unit = dict(
        line.split("=", 1) for line in SERVICE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    budget = config.MemoryConfig().max_memory_usage
    assert parse_size(unit["MemoryHigh"] + "iB") == budget  # "2G" in systemd means GiB
    assert parse_size(unit["MemoryMax"].replace("M", "MiB")) == budget * 5 // 4
    assert unit["RestartPreventExitStatus"] == "2"
    assert unit["Documentation"] == "man:elemta(8) man:elemta.toml(5)"
