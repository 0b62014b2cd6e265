"""check-config's capacity warnings: none for the built-in defaults or the packaged conffile on a
machine that can hold them; each warning for a config (or machine) that deserves it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from elemta import capacity, config
from elemta.memory.snapshot import LimitSource

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
MiB = 1024**2


def packaged_conffile(tmp_path: Path) -> Path:
    text = subprocess.run([sys.executable, str(ROOT / "packaging" / "gen-conffile.py")],
                          capture_output=True, text=True, check=True).stdout
    path = tmp_path / "elemta.toml"
    path.write_text(text)
    return path


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_builtin_defaults_warn_about_nothing_in_config_warnings() -> None:
    assert config.warnings(config.Config()) == []


def test_packaged_conffile_warns_about_nothing_in_config_warnings(tmp_path: Path) -> None:
    assert config.warnings(config.load(str(packaged_conffile(tmp_path)))) == []


def test_packaged_conffile_and_built_in_default_agree_on_workers_auto(tmp_path: Path) -> None:
    path = packaged_conffile(tmp_path)
    assert '\n#workers = "auto"\n' in path.read_text()  # shown, left to the default
    assert config.load(str(path)).server.workers == config.Config().server.workers == "auto"
    assert config.load(str(path)).server.pin_workers is True


def test_check_config_with_the_packaged_conffile_prints_no_warning(tmp_path: Path) -> None:
    out = check_config("--config", str(packaged_conffile(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, out.stderr


def test_gc_threshold_outside_warning_and_critical_is_an_error_not_a_warning(
        tmp_path: Path) -> None:
    """Stronger than the issue's warning: load() refuses it (exit 2), naming the three keys."""
    path = tmp_path / "elemta.toml"
    path.write_text("[memory]\ngc_threshold = 0.95\n")
    out = check_config("--config", str(path))
    assert out.returncode == 2
    assert "gc_threshold (0.95)" in out.stderr and "memory_critical_threshold" in out.stderr


def test_one_session_larger_than_the_room_above_critical_warns() -> None:
    # 512 MiB budget, critical 0.9: 53.7 MB above critical; a 100 MB session can cross it alone.
    m = config.MemoryConfig(max_memory_usage=512 * MiB, per_connection_memory_limit=100_000_000)
    lines = config.warnings(config.Config(memory=m))
    assert len(lines) == 1, lines
    assert "per_connection_memory_limit (100000000)" in lines[0]
    assert "memory_critical_threshold (0.9)" in lines[0] and "max_memory_usage" in lines[0]


def test_max_goroutines_below_twice_max_connections_warns() -> None:
    cfg = config.Config(memory=config.MemoryConfig(max_goroutines=1500))
    lines = config.warnings(cfg)
    assert len(lines) == 1 and "max_goroutines (1500)" in lines[0]


ROOMY = capacity.Machine(ram=16 * GiB, cgroup_limit=None, cgroup_source=None, unit_limit=None)


def test_defaults_and_conffile_on_a_roomy_machine_warn_about_nothing(tmp_path: Path) -> None:
    assert capacity.warnings(config.Config(), ROOMY) == []
    assert capacity.warnings(config.load(str(packaged_conffile(tmp_path))), ROOMY) == []
    # The packaged unit (MemoryMax=2560M) under systemd is roomy too.
    unit = capacity.Machine(16 * GiB, 2560 * MiB, LimitSource.CGROUP_V2, 2560 * MiB)
    assert capacity.warnings(config.Config(), unit) == []


def test_ram_below_one_and_a_half_budgets_warns() -> None:
    machine = capacity.Machine(ram=3 * GiB - 1, cgroup_limit=None, cgroup_source=None,
                               unit_limit=None)
    (line,) = capacity.warnings(config.Config(), machine)
    assert "max_memory_usage (2147483648, 2.0 GiB) x 1.5 exceeds this machine's RAM" in line
    ok = capacity.Machine(ram=3 * GiB, cgroup_limit=None, cgroup_source=None, unit_limit=None)
    assert capacity.warnings(config.Config(), ok) == []


def test_cgroup_and_unit_limits_below_the_budget_warn_and_name_the_one_that_binds() -> None:
    machine = capacity.Machine(16 * GiB, 1 * GiB, LimitSource.CGROUP_V1, 1536 * MiB)
    unit_line, cgroup_line, interval_line = capacity.warnings(config.Config(), machine)
    assert unit_line.startswith("<built-in defaults>: elemta.service MemoryMax= (1610612736")
    assert "the current cgroup's limit (cgroup-v1) binds, lower still" in unit_line
    assert "the current cgroup's memory limit (cgroup-v1) (1073741824" in cgroup_line
    assert "(it binds)" in cgroup_line and "max_memory_usage (2147483648)" in cgroup_line
    # 1000 sessions' buffers (322 MiB) exceed the 256 MiB from 75% to 1 GiB.
    assert "monitoring_interval (5s)" in interval_line and "1.0 GiB, the current cgroup" \
        in interval_line


def test_monitoring_interval_too_long_for_a_burst_warns() -> None:
    # 10000 sessions' buffers (3.1 GiB) do not fit between 75% and 2 GiB (512 MiB), which a
    # burst at the measured ingest rate crosses in ~2.1 s: 5 s between samples is too long.
    big = config.Config(server=config.ServerConfig(max_connections=10000),
                        memory=config.MemoryConfig(max_goroutines=20000))
    (line,) = capacity.warnings(big, ROOMY)
    assert "[memory] monitoring_interval (5s) is longer than the 2.10s" in line
    assert "[server] max_connections (10000)" in line
    fast = config.Config(server=config.ServerConfig(max_connections=10000),
                         memory=config.MemoryConfig(max_goroutines=20000,
                                                    monitoring_interval=1.0))
    assert capacity.warnings(fast, ROOMY) == []


def test_explain_names_limit_source_and_headroom() -> None:
    out = check_config("--explain")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("effective memory limit: ") and "source " in first
    assert "headroom: " in out.stdout and "worst case: 1000 sessions" in out.stdout
    # The default workers = "auto", decided from this machine's CPUs and the limit above.
    cpus = len(os.sched_getaffinity(0))
    workers = next(ln for ln in out.stdout.splitlines() if ln.startswith("workers: "))
    assert f"usable CPUs {min(cpus, 64)} = min(affinity {cpus}, cgroup quota" in workers
    assert "memory cap " in workers and "25% of the memory limit" in workers


def test_the_worker_plan_follows_the_machine() -> None:
    many = capacity.Machine(256 * GiB, None, None, None, cpus=64)
    assert capacity.worker_plan(config.Config(), many).describe() == \
        "17 (64 usable CPUs; memory cap 17)"
    quota = capacity.Machine(256 * GiB, 512 * MiB, LimitSource.CGROUP_V2, None, cpus=8,
                             cpu_quota=1.5)
    assert capacity.worker_plan(config.Config(), quota).describe() == \
        "2 (2 usable CPUs; memory cap 4)"


def test_a_limit_too_small_for_the_sessions_buffers_says_lower_max_connections() -> None:
    # 160 MiB: 40 MiB from 75% to the limit hold the buffers of 124 sessions, not 1000.
    machine = capacity.Machine(16 * GiB, 160 * MiB, LimitSource.CGROUP_V1, None)
    lines = capacity.warnings(config.Config(), machine)
    assert "no interval is short enough; lower max_connections to 124" in lines[-1]
