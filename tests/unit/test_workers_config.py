"""[server] workers / event_loop parsing, and the supervisor's pure decisions."""

from __future__ import annotations

import sys
import tomllib

import pytest

from elemta import config, runtime
from elemta.cpus import usable_cpus
from elemta.supervisor import MAX_BACKOFF, backoff, share


def build(server: str) -> config.Config:
    text = f"[server]\n{server}\n"
    return config.build(tomllib.loads(text), "t.toml", text)


@pytest.mark.parametrize(("value", "count"), [("1", 1), ("2", 2), ("64", 64)])
def test_workers_numbers(value: str, count: int) -> None:
    assert runtime.worker_plan(build(f"workers = {value}")).count == count


def test_workers_auto_is_the_default_and_the_usable_cpus_within_the_memory_cap() -> None:
    cfg = build('workers = "auto"')
    assert cfg.server.workers == "auto" == config.Config().server.workers
    plan = runtime.worker_plan(cfg)
    assert plan.count == min(64, usable_cpus(), plan.memory_cap)
    assert plan.limit == runtime.memory_limit(cfg) <= cfg.memory.max_memory_usage


@pytest.mark.parametrize("bad", ["0", "65", '"two"', "true", "1.5", '"AUTO"'])
def test_bad_workers_name_the_key(bad: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        build(f"workers = {bad}")
    assert "t.toml:2: [server] workers:" in err.value.problems[0]


def test_workers_and_event_loop_round_trip() -> None:
    for snippet in ('workers = "auto"\nevent_loop = "asyncio"', "workers = 3"):
        cfg = build(snippet)
        again = config.build(tomllib.loads(config.to_toml(cfg)), cfg.source)
        assert (again.server.workers, again.server.event_loop) == (cfg.server.workers,
                                                                   cfg.server.event_loop)


def test_uvloop_when_not_installed_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import machinery: "not installed"
    with pytest.raises(config.ConfigError) as err:
        build('event_loop = "uvloop"')
    assert "[server] event_loop" in err.value.problems[0]
    assert "not installed" in err.value.problems[0]


def test_share_divides_the_task_cap_rounding_up() -> None:
    cfg = build("max_connections = 1001\n")
    one = share(cfg, 2)
    assert one.server.max_connections == 1001  # daemon-wide through the SessionBoard
    assert one.memory.max_goroutines == 1000
    assert share(cfg, 3).memory.max_goroutines == 667
    assert one.server.listen == cfg.server.listen


def test_backoff_grows_and_is_bounded() -> None:
    delays = [backoff(n) for n in range(12)]
    assert delays[0] == 0.0
    assert delays[1:5] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == MAX_BACKOFF


def test_session_board_counts_sessions_in_data_across_workers_apart_from_open_ones() -> None:
    from elemta.sessionboard import SessionBoard

    board = SessionBoard(3)
    board.set(1, 10)
    board.set(2, 7)
    board.set_in_data(1, 4)
    board.set_in_data(2, 2)
    assert (board.total(), board.in_data()) == (17, 6)
    board.set_in_data(2, 0)  # the supervisor clears a dead worker's slot
    assert (board.total(), board.in_data()) == (17, 4)
