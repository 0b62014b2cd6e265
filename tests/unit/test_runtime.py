"""runtime.py: what the daemon builds from a Config (host name, token) and the one-line problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from elemta import config, runtime


def test_a_configured_hostname_is_used_as_is_and_an_empty_one_is_the_fqdn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_fqdn", lambda: "box.example.net")
    assert runtime.hostname(config.ServerConfig(hostname="mx.test")) == "mx.test"
    assert runtime.hostname(config.ServerConfig()) == "box.example.net"


@pytest.mark.parametrize("fqdn", ["box/1", "box:1", "bad\r\nname", "192.0.2.7"])
def test_a_host_whose_own_name_is_no_hostname_needs_one_configured(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fqdn: str) -> None:
    # Edge case only a fake host name reaches: Linux accepts almost any bytes in sethostname.
    monkeypatch.setattr(runtime, "_fqdn", lambda: fqdn)
    path = tmp_path / "e.toml"
    path.write_text("[server]\nmax_recipients = 10\n")
    (line,) = runtime.problems(config.load(path))
    assert line.startswith(f"{path}:1: [server] hostname: empty, and the host's own name"), line
    assert "set [server] hostname" in line and "\n" not in line and "\r" not in line


def _token(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_token_file_is_read_without_its_newline(tmp_path: Path) -> None:
    assert runtime.api_token(_token(tmp_path, "0123456789abcdef0123\n", 0o640)) == \
        b"0123456789abcdef0123"
    assert runtime.api_token("") is None


@pytest.mark.parametrize(("text", "mode", "problem"), [
    ("0123456789abcdef0123\n", 0o644, "readable by others (mode 0644)"),
    ("0123456789abcdef0123\n", 0o602, "readable by others (mode 0602)"),
    ("short\n", 0o600, "at least 16 visible ASCII"),
    ("0123456789 abcdef0123\n", 0o600, "at least 16 visible ASCII"),
    ("0123456789abcdef0123\nsecond line\n", 0o600, "at least 16 visible ASCII"),
    ("0123456789abcdéf0123\n", 0o600, "at least 16 visible ASCII"),
])
def test_unsafe_or_malformed_token_files_are_refused(tmp_path: Path, text: str, mode: int,
                                                      problem: str) -> None:
    with pytest.raises(runtime.SetupError) as exc:
        runtime.api_token(_token(tmp_path, text, mode))
    assert exc.value.key == "token_file" and problem in exc.value.problem, exc.value.problem


def test_a_symlinked_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    target = _token(tmp_path, "0123456789abcdef0123\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    for path, problem in ((str(link), "cannot open"), (str(tmp_path / "nope"), "cannot open"),
                          (str(tmp_path), "not a regular file")):
        with pytest.raises(runtime.SetupError) as exc:
            runtime.api_token(path)
        assert problem in exc.value.problem, exc.value.problem
