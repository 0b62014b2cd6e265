"""Config loading: the guide's presets load unchanged; each class of bad input is one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from elemta import config
from elemta.units import format_duration, parse_duration, parse_size

# A copy of ../shared/reference/memory-configuration-guide.md, the contract: its TOML must load.
GUIDE = Path(__file__).resolve().parents[1] / "data/memory-configuration-guide.md"


def guide_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.S)


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_every_toml_block_of_the_guide_loads_unchanged(tmp_path: Path) -> None:
    blocks = guide_blocks()
    assert len(blocks) == 5  # the full example and the four tuning presets
    for i, block in enumerate(blocks):
        path = tmp_path / f"preset{i}.toml"
        path.write_text(block)
        cfg = config.load(path)
        data = tomllib.loads(block)["memory"]
        for key, value in data.items():
            got = getattr(cfg.memory, key)
            want = parse_duration(value) if key == "monitoring_interval" else value
            assert got == want, (i, key)
        out = run_check(path)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr


def test_defaults_are_the_guides() -> None:
    m = config.Config().memory
    assert (m.max_memory_usage, m.per_connection_memory_limit) == (2147483648, 52428800)
    assert (m.memory_warning_threshold, m.gc_threshold, m.memory_critical_threshold) == (0.75, 0.80, 0.90)
    assert (m.monitoring_interval, m.max_goroutines) == (5.0, 2000)
    assert m.goroutine_leak_detection and m.memory_exhaustion_protection
    s = config.Config().server
    assert (s.max_connections, s.max_message_size, s.max_recipients) == (1000, 52428800, 100)
    assert [str(a) for a in s.listen] == ["127.0.0.1:2525"]
    assert str(config.Config().api.listen) == "127.0.0.1:8080"
    assert config.Config().delivery.domains == ("localhost", "example.test")


def test_effective_config_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:25", "[::1]:25"]\n[memory]\nmax_memory_usage = "512MiB"\n'
                    'monitoring_interval = "250ms"\n')
    out = run_check(path)
    assert out.returncode == 0
    again = tmp_path / "again.toml"
    again.write_text(out.stdout)
    assert config.load(again) == config.load(path)
    assert "max_memory_usage = 536870912" in out.stdout
    assert 'monitoring_interval = "250ms"' in out.stdout


def test_per_connection_times_connections_over_budget_warns_but_passes(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[memory]\nmax_memory_usage = \"100MiB\"\nper_connection_memory_limit = \"10MiB\"\n"
                    "[server]\nmax_connections = 50\n")
    out = run_check(path)
    assert out.returncode == 0
    assert "warning" in out.stderr and "per_connection_memory_limit" in out.stderr


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[memroy]\nx = 1\n", "[memroy]: unknown section"),
        ("[memory]\nmax_memory_usgae = 1\n", "[memory] max_memory_usgae: unknown key (did you mean max_memory_usage?)"),
        ("[memory]\nmax_goroutines = \"many\"\n", "[memory] max_goroutines: expected an integer"),
        ("[memory]\ngoroutine_leak_detection = 1\n", "[memory] goroutine_leak_detection: expected true or false"),
        ("[memory]\nmemory_critical_threshold = 1.5\n", "[memory] memory_critical_threshold: must be between 0.0 and 1.0"),
        ("[server]\nmax_connections = 0\n", "[server] max_connections: must be at least 1"),
        ("[memory]\ngc_threshold = 0.95\n", "thresholds out of order"),
        ("[memory]\nmax_memory_usage = \"lots\"\n", "[memory] max_memory_usage: cannot parse size 'lots'"),
        ("[memory]\nmonitoring_interval = \"5 parsecs\"\n", "[memory] monitoring_interval: cannot parse duration"),
        ("[server]\nlisten = [\"nowhere\"]\n", "[server] listen: cannot parse listen address"),
        ("[delivery]\ndomains = [\"bad domain\"]\n", "[delivery] domains: 'bad domain' is not a domain name"),
        ("[logging]\nformat = \"xml\"\n", "[logging] format: must be one of auto, journal, json, text"),
        ("[memory\n", "TOML syntax error"),
        ("memory = 3\n", "expected a [memory] table"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    out = run_check(path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and needle in lines[0], lines[0]


def test_key_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("# comment\n[memory]\nmax_goroutines = 2000\nmax_memory_usgae = 1\n")
    out = run_check(path)
    assert f"{path}:4: [memory] max_memory_usgae" in out.stderr


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[memory]\nfoo = 1\nbar = 2\n[server]\nmax_recipients = -1\n")
    out = run_check(path)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 3


def test_missing_file_is_exit_2(tmp_path: Path) -> None:
    out = run_check(tmp_path / "nope.toml")
    assert out.returncode == 2
    assert "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[memory]\nmax_memory_usgae = 1\n")
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "max_memory_usgae" in out.stderr


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and re.fullmatch(r"elemta \d+\.\d+\.\d+\n", out.stdout)


@pytest.mark.parametrize(
    ("text", "n"),
    [(1024, 1024), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("2 GiB", 2 * 2**30), ("1.5k", 1500),
     ("100", 100)],
)
def test_sizes(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(("text", "s"), [("5s", 5.0), ("250ms", 0.25), ("1m", 60.0), ("2h", 7200.0), (3, 3.0)])
def test_durations(text: object, s: float) -> None:
    assert parse_duration(text) == s
    assert parse_duration(format_duration(s)) == s


@pytest.mark.parametrize("bad", [True, -1, "1 parsec", "", "MiB", [1]])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_session_budget_minimum_lies_above_the_buffers_elemta_sizes_itself() -> None:
    # What one session in DATA can hold by elemta's own choice: a full socket read (sessions cut
    # asyncio's 256 KiB to smtp.server.CHUNK) on top of
    # what a session buffers before it stops reading (INPUT_LIMIT), the spool's buffer before
    # its first write, one partial line in the decoder. The smallest accepted budget must exceed it, or a large
    # message sent in big segments gets 552 5.3.4 for memory the client never asked us to hold.
    import dataclasses

    from elemta.smtp.dataparse import LINE_LIMIT
    from elemta.smtp.server import CHUNK, INPUT_LIMIT
    from elemta.store.maildir import SPOOL_BUFFER

    fixed = (CHUNK + INPUT_LIMIT + SPOOL_BUFFER + LINE_LIMIT + 2)
    assert fixed < config.MIN_SESSION_MEMORY
    spec = {f.name: f for f in dataclasses.fields(config.MemoryConfig)}
    assert spec["per_connection_memory_limit"].metadata["min"] == config.MIN_SESSION_MEMORY
    with pytest.raises(config.ConfigError) as err:
        config.build({"memory": {"per_connection_memory_limit": config.MIN_SESSION_MEMORY - 1}})
    assert "[memory] per_connection_memory_limit: must be at least 524288" in str(err.value)
    assert "64 KiB socket reads" in str(err.value) and "552 5.3.4" in str(err.value)
