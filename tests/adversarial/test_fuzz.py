"""Property-based fuzzing: random SMTP conversations at a live daemon, random TOML at the loader."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import Daemon, running
from elemta import config

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][\x20-\x7e]*\r\n")

verbs = st.sampled_from([b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT",
                         b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"mail from:", b"XYZZY", b""])
args = st.one_of(
    st.just(b""),
    st.sampled_from([b"<a@example.test>", b"<>", b"<postmaster>", b"<x@elsewhere.example>", b" SIZE=100",
                     b"<a@example.test> BODY=8BITMIME", b"client.test", b"<a b>", b"<@x:y@example.test>"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)
bodies = st.lists(st.sampled_from([b"line\r\n", b".dot\r\n", b"..\r\n", b"\n.\n", b"\r", b"\x00\xff", b"x" * 1200,
                                   b"\r\n"]), max_size=12).map(b"".join)
commands = st.lists(st.tuples(verbs, args, bodies), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def live() -> Iterator[Daemon]:
    with running(Path(tempfile.mkdtemp(prefix="elemta-fuzz-")), '[server]\ncommand_timeout = "20s"') as d:
        yield d


def read_reply(f: object) -> list[bytes]:
    lines = []
    while True:
        line = f.readline(4096)  # type: ignore[attr-defined]
        if not line:
            return lines
        assert REPLY_LINE.fullmatch(line), line
        lines.append(line)
        if line[3:4] == b" ":
            return lines


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands)
def test_every_reply_is_well_formed_and_the_daemon_keeps_serving(live: Daemon, script: list[tuple[bytes, bytes, bytes]]) -> None:
    with socket.create_connection((live.host, live.port), timeout=20) as s:
        f = s.makefile("rb")
        assert read_reply(f)[0].startswith(b"220")
        for verb, arg, body in script:
            line = verb + (b" " + arg if arg and not verb.endswith(b":") else arg)
            s.sendall(line + b"\r\n")
            reply = read_reply(f)
            if not reply:  # the daemon may close after QUIT or too many bad commands
                break
            code = reply[-1][:3]
            if code == b"354":
                s.sendall(body + b"\r\n.\r\n")
                assert read_reply(f), "no reply after DATA"
            # 221 and 421 close the session (421 also after too many unknown commands).
            if code in (b"221", b"421") or (verb == b"STARTTLS" and code == b"220"):
                break
    assert live.proc.poll() is None
    with socket.create_connection((live.host, live.port), timeout=20) as s:
        assert s.recv(3) == b"220"


keys = st.sampled_from([f.name for _, f in config.iter_keys()] + ["bogus", "max_memory_usgae"])
sections = st.sampled_from([*config.SECTIONS, "nonsense"])
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.booleans(),
    st.text(max_size=20), st.sampled_from(["512MiB", "5s", "250ms", "0", "-1", "1e3", "127.0.0.1:25", "[::1]:0"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
documents = st.dictionaries(sections, st.one_of(st.dictionaries(keys, values, max_size=5), scalars), max_size=4)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_random_config_data_is_accepted_or_refused_cleanly(doc: dict[str, object]) -> None:
    try:
        cfg = config.build(doc, "fuzz.toml")
    except config.ConfigError as exc:
        assert exc.problems and all(p.startswith("fuzz.toml") and "\n" not in p for p in exc.problems)
    else:
        assert isinstance(cfg, config.Config)
        for section, f in config.iter_keys():
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float):
                assert value == value and value not in (float("inf"), float("-inf")), (section, f.name)
        assert config.build(tomllib.loads(config.to_toml(cfg)), "again") == cfg


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]=\"'.#\n abc_0123456789memoryserverlisten:-{}")), max_size=120))
def test_random_toml_text_never_crashes_the_loader(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        config.load(f.name)
    except config.ConfigError as exc:
        assert all(p.startswith(f.name) for p in exc.problems)
    finally:
        Path(f.name).unlink()


@settings(max_examples=15, deadline=None)
@given(documents)
def test_check_config_exits_0_or_2_without_traceback(doc: dict[str, object]) -> None:
    text = "\n".join(
        f"[{name}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in body.items()) if isinstance(body, dict)
        else f"{name} = {_toml(body)}"
        for name, body in doc.items()
    )
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", f.name],
                             capture_output=True, text=True, timeout=60)
    finally:
        Path(f.name).unlink()
    assert out.returncode in (0, 2), out.stderr
    assert "Traceback" not in out.stderr


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + "}"
    raise TypeError(v)
