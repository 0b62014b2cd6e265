"""`elemta queue` and /api/queue against a running daemon (and against none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_queue_daemon import LOCAL, REMOTE, queue_extra, records

from daemon import Daemon, free_port, running, wait_until
from httpclient import get


def cli(d: Daemon | None, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "elemta.cli", "queue", *args]
    if d is not None:
        cmd += ["--config", str(d.config_path)]
    elif config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_list_show_hold_release_flush_delete(tmp_path: Path) -> None:
    with running(tmp_path, queue_extra(tmp_path)) as d:
        for n in range(2):
            d.send([LOCAL, REMOTE], f"Message-ID: <{n}@adm>\r\n\r\nx\r\n".encode())
        wait_until(lambda: d.log.count("status=deferred") == 2, "both deferred")
        ids = sorted(records(tmp_path / "queue"))
        out = cli(d)
        assert out.returncode == 0, out.stderr
        for qid in ids:
            assert qid in out.stdout
        assert f"{REMOTE}  pending via lmtp:" in out.stdout
        assert f"{LOCAL}  delivered via maildir" in out.stdout
        assert "-- 2 message(s)" in out.stdout
        show = cli(d, "show", ids[0])
        assert show.returncode == 0 and show.stdout.startswith(ids[0]) and "deferred" in show.stdout

        assert cli(d, "hold", ids[0]).stdout == f"{ids[0]}: on hold\n"
        assert (tmp_path / "queue" / "hold" / ids[0]).exists()
        assert "\n" + ids[0] + "  hold" in "\n" + cli(d).stdout
        assert cli(d, "release", ids[0]).stdout == f"{ids[0]}: scheduled now\n"
        wait_until(lambda: d.log.count("status=deferred") == 3, "released and tried again")

        flushed = cli(d, "flush")
        assert flushed.returncode == 0 and flushed.stdout.endswith("scheduled now\n"), flushed
        wait_until(lambda: d.log.count("status=deferred") == 5, "both tried again")

        assert cli(d, "delete", ids[1]).stdout == f"{ids[1]}: deleted\n"
        assert not (tmp_path / "queue" / "body" / ids[1]).exists()
        gone = cli(d, "show", ids[1])
        assert gone.returncode == 1 and gone.stderr == f"elemta: no such message: {ids[1]} " \
            "(HTTP 404)\n"
        bad = cli(d, "release", ids[1])
        assert bad.returncode == 1 and "no such message" in bad.stderr
        # Not on hold: a one-line refusal.
        wrong = cli(d, "release", ids[0])
        assert wrong.returncode == 1 and wrong.stderr.startswith("elemta: ") and \
            "not on hold" in wrong.stderr, wrong
        assert cli(d, "delete").returncode == 2  # no ID

        # POST is only for the queue: other paths still say 405, unknown ones 404.
        assert get(d, "/api/stats", method="POST").status == 405
        assert get(d, "/api/queue/flush", method="GET").status == 404
        assert get(d, "/api/queue/ZZZ/explode", method="POST").status == 404


def test_the_token_guards_the_queue(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    with running(tmp_path, queue_extra(tmp_path) + f'[api]\ntoken_file = "{token}"\n') as d:
        assert get(d, "/api/queue").status == 401
        assert get(d, "/api/queue/flush", method="POST").status == 401
        assert cli(d).returncode == 0  # the CLI sends the token of the config it reads


def test_no_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = tmp_path / "elemta.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{free_port()}"\n')
    out = cli(None, config=cfg)
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert line.startswith("elemta: the daemon is not running (cannot reach http://127.0.0.1:")


def test_a_daemon_without_queue_says_so(tmp_path: Path) -> None:
    with running(tmp_path) as d:
        out = cli(d)
        assert out.returncode == 1 and "no queue" in out.stderr
