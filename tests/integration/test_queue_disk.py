"""Disk admission ([delivery] queue_minfree) in a real daemon, against the real free space of
the test's filesystem: below it MAIL gets 452 4.3.1; a SIZE= that does not fit, too."""

from __future__ import annotations

from pathlib import Path

from daemon import running
from elemta.queue.disk import declared_size, disk_refusal, free_bytes


def test_disk_refusal_decisions() -> None:
    assert disk_refusal(None, 100, 10) is None
    assert disk_refusal(1000, 0, 10**9) is None  # 0: the check is off
    assert disk_refusal(99, 100, 0) == "452 4.3.1 Insufficient system storage"
    assert disk_refusal(1000, 100, 900) is None
    assert disk_refusal(1000, 100, 901) is not None and "of that size" in (
        disk_refusal(1000, 100, 901) or "")
    assert declared_size(["BODY=8BITMIME", "size=1234"]) == 1234
    assert declared_size(["SIZE=x"]) == 0


def test_free_bytes_of_a_path_not_created_yet(tmp_path: Path) -> None:
    # The nearest existing ancestor's filesystem; others write to it meanwhile (the machine is
    # shared), so its free space may move a little between the reads.
    before = free_bytes([tmp_path])
    measured = free_bytes([tmp_path / "not" / "yet"])
    after = free_bytes([tmp_path])
    slack = 16 * 1024 * 1024
    assert min(before, after) - slack <= measured <= max(before, after) + slack


def test_mail_gets_452_when_the_filesystem_is_below_queue_minfree(tmp_path: Path) -> None:
    with running(tmp_path, '[delivery]\nqueue_minfree = "1000TiB"\n') as d, d.smtp() as s:
        s.ehlo("client.test")
        code, text = s.mail("s@example.org")
        assert (code, text) == (452, b"4.3.1 Insufficient system storage")


def test_a_size_that_does_not_fit_gets_452_up_front(tmp_path: Path) -> None:
    free = free_bytes([tmp_path])
    extra = '[delivery]\nqueue_minfree = "1MiB"\n[server]\nmax_message_size = "1000TiB"\n'
    with running(tmp_path, extra) as d, d.smtp() as s:
        s.ehlo("client.test")
        code, text = s.mail("s@example.org", [f"SIZE={free * 2}"])
        assert code == 452 and text.startswith(b"4.3.1 Insufficient system storage"), text
        s.rset()
        assert s.mail("s@example.org", ["SIZE=1000"])[0] == 250
