"""SIGHUP reload decisions: what applies at once, what waits for a restart, what is rejected."""

from __future__ import annotations

from pathlib import Path

from elemta import config
from elemta.reload import RESTART_ONLY, reload_config


def write(path: Path, text: str) -> config.Config:
    path.write_text(text)
    return config.load(path)


def test_live_keys_apply_and_restart_only_keys_keep_their_running_value(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    running = write(path, '[server]\nlisten = "127.0.0.1:2525"\n[delivery]\ndomains = ["a.test"]\n')
    path.write_text('[server]\nlisten = "127.0.0.1:2600"\nmax_recipients = 5\n'
                    '[delivery]\ndomains = ["b.test"]\nmaildir_root = "/elsewhere"\n'
                    '[memory]\nmax_memory_usage = "256MiB"\n')
    out = reload_config(running)
    assert out.config is not None and not out.problems
    assert set(out.changed) == {"server.max_recipients", "delivery.domains",
                                "memory.max_memory_usage"}
    assert set(out.needs_restart) == {"server.listen", "delivery.maildir_root"}
    assert out.config.delivery.domains == ("b.test",)
    assert out.config.memory.max_memory_usage == 256 * 1024 * 1024
    assert out.config.server.listen == running.server.listen  # still bound to the old address
    assert out.config.delivery.maildir_root == running.delivery.maildir_root


def test_a_broken_file_is_rejected_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "elemta.toml"
    running = write(path, "[memory]\ngc_threshold = 0.8\n")
    path.write_text("[memory]\ngc_threshold = 1.5\n")
    out = reload_config(running)
    assert out.config is None
    assert len(out.problems) == 1
    assert "gc_threshold" in out.problems[0] and str(path) in out.problems[0]


def test_restart_only_names_real_keys() -> None:
    keys = {(section, f.name) for section, f in config.iter_keys()}
    assert set(RESTART_ONLY) <= keys
