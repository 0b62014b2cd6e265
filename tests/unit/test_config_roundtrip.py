"""`check-config` prints TOML that loads back to the same Config, for every value a key accepts.

Strings carry control characters, quotes, backslashes and non-ASCII; every key of every section
is generated from its declared kind and bounds (a key whose kind has no strategy here fails the
test, so a new kind cannot slip past it).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from elemta import config

# Any text but NUL (no config string may hold one: it cannot reach a file name or a header).
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
               max_size=40)
TRICKY = st.sampled_from(['"', "\\", "\n", "\r", "\t", "\x01", "\x1f", "\x7f", "\u0085",
                          "\u2028", "é", "雪", "😀", "'''", '"""', "\\u0041", "#", "[x]"])
STRINGS = st.one_of(TEXT, st.lists(st.one_of(TRICKY, TEXT), max_size=6).map("".join))

LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(
    lambda h: len(h) <= 253 and not h.rsplit(".", 1)[-1].isdigit())
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
TRANSPORTS = st.one_of(
    st.just("maildir"),
    st.tuples(st.one_of(IPV4, HOSTNAME), st.integers(1, 65535)).map(lambda t: f"lmtp:{t[0]}:{t[1]}"),
    st.tuples(IPV6, st.integers(1, 65535)).map(lambda t: f"lmtp:[{t[0]}]:{t[1]}"),
    st.from_regex(r"/[a-z0-9/._-]{1,30}", fullmatch=True).map(lambda p: f"lmtp:unix:{p}"),
    st.tuples(st.one_of(IPV4, IPV6, HOSTNAME), st.integers(1, 65535)).map(
        lambda t: f"smtp:[{t[0]}]:{t[1]}"),
)


def _number(meta: dict[str, Any], default_max: float, integer: bool) -> st.SearchStrategy[Any]:
    lo = meta["min"] if meta["min"] is not None else 0
    hi = meta["max"] if meta["max"] is not None else default_max
    if integer:
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _listen1() -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(st.one_of(IPV4, HOSTNAME), PORT).map(lambda t: f"{t[0]}:{t[1]}"),
        st.tuples(IPV6, PORT).map(lambda t: f"[{t[0]}]:{t[1]}"),
    )


def strategy(section: str, f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    """Raw TOML values across the key's whole domain (`build` parses them)."""
    meta = dict(f.metadata)
    kind = meta["kind"]
    if kind == "size":
        return st.one_of(_number(meta, 2**63 - 1, True),
                         st.integers(1, 4096).map(lambda n: f"{n}MiB"))
    if kind == "int":
        return _number(meta, 2**63 - 1, True)
    if kind == "duration":
        return st.one_of(_number(meta, 86400, False), _number(meta, 86400, True),
                         st.integers(1, 999).map(lambda n: f"{n}ms"))
    if kind == "fraction":
        return st.floats(0.0, 1.0, exclude_min=True)
    if kind == "bool":
        return st.booleans()
    if kind == "str":
        return STRINGS
    if kind == "hostname":
        return st.one_of(st.just(""), HOSTNAME)
    if kind == "choice":
        # uvloop is valid only where the module is installed.
        return st.sampled_from([c for c in meta["choices"]
                                if c != "uvloop" or config.uvloop_available()])
    if kind == "workers":
        return st.one_of(st.just("auto"), _number(meta, 64, True))
    if kind == "listen":
        return st.lists(_listen1(), min_size=1, max_size=3)
    if kind == "listen1":
        return _listen1()
    if kind == "domains":
        return st.lists(HOSTNAME, max_size=3)
    if kind == "notice_classes":
        return st.lists(st.sampled_from(config.NOTICE_CLASSES), unique=True)
    if kind == "recipients":
        # "file:PATH" must name a readable map: tests/unit/test_recipient_map.py covers it.
        return st.sampled_from(["maildir", "any"])
    if kind == "relay_recipients":
        # "file:PATH" must name a readable map: tests/integration/test_relay_recipients.py.
        return st.sampled_from(["any", "smtp"])
    if kind == "transport":
        return TRANSPORTS
    if kind == "relay_transport":
        return st.one_of(st.just(""), TRANSPORTS.filter(lambda t: t != "maildir"))
    if kind == "routes":
        # Routed domains must be [delivery] domains: draw from the defaults.
        return st.lists(st.fixed_dictionaries({
            "domain": st.sampled_from(["localhost", "example.test"]), "transport": TRANSPORTS}),
            max_size=2, unique_by=lambda r: r["domain"])
    raise AssertionError(f"no strategy for [{section}] {f.name} (kind {kind!r}): add one here")


@st.composite
def raw_configs(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {}
    for section, f in config.iter_keys():
        if draw(st.booleans()):
            data.setdefault(section, {})[f.name] = draw(strategy(section, f))
    d = data.get("delivery", {})
    if d.get("relay_domains") and not d.get("relay_transport"):
        # Relay domains need somewhere to go (a cross-key rule): without this, most drawn
        # configs with relay domains would be rejected and the search would crawl.
        d["relay_transport"] = draw(TRANSPORTS.filter(lambda t: t != "maildir"))
    return data


def _build(data: dict[str, dict[str, Any]]) -> config.Config:
    try:
        return config.build(data, "generated.toml")
    except config.ConfigError:
        # Cross-key rules (threshold order, TLS pairs, token_file for a non-loopback listen)
        # reject some combinations; those are tested on their own.
        assume(False)
        raise


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(raw_configs())
def test_to_toml_loads_back_to_the_same_config(data: dict[str, dict[str, Any]]) -> None:
    cfg = _build(data)
    text = config.to_toml(cfg)
    again = config.build(tomllib.loads(text), "again.toml", text)
    assert again == cfg


@settings(max_examples=200, deadline=None)
@given(STRINGS, STRINGS)
def test_every_string_survives(maildir_root: str, source: str) -> None:
    cfg = dataclasses.replace(
        config.Config(source=source),
        delivery=dataclasses.replace(config.Config().delivery, maildir_root=maildir_root))
    text = config.to_toml(cfg)
    assert tomllib.loads(text)["delivery"]["maildir_root"] == maildir_root


@pytest.mark.parametrize("value", ['a"b\\c', "line\nbreak", "bell\x07", "del\x7f", "tab\tok",
                                   "ünï\u2028cödé", "cr\r"])
def test_check_config_output_through_the_cli_loads_back(tmp_path: Path, value: str) -> None:
    escaped = "".join(f"\\u{ord(c):04X}" if c in '"\\' or ord(c) < 0x20 or c == "\x7f" else c
                      for c in value)
    path = tmp_path / "in.toml"
    path.write_text(f'[delivery]\nmaildir_root = "{escaped}"\n', encoding="utf-8")
    want = config.load(path)
    assert want.delivery.maildir_root == value
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(out.stdout or "", encoding="utf-8")
    assert out.stdout, out.stderr
    assert config.load(printed) == want
    again = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config",
                            str(printed)], capture_output=True, text=True, timeout=60)
    assert "TOML syntax error" not in again.stderr, again.stderr
    assert again.stdout.split("\n", 1)[1] == out.stdout.split("\n", 1)[1]


ANY_TOML = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), STRINGS,
              st.text(max_size=5).map(lambda s: s + "\x00")),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_value_for_any_key_is_a_config_or_one_line_per_problem(data: st.DataObject) -> None:
    section, f = data.draw(st.sampled_from(list(config.iter_keys())))
    value = data.draw(ANY_TOML)
    try:
        config.build({section: {f.name: value}}, "any.toml")
    except config.ConfigError as exc:
        # A valid value may still break a rule between keys (a TLS key without certificate):
        # that line names the other key. Every line names file, section and key.
        assert exc.problems
        for line in exc.problems:
            assert re.fullmatch(r"any\.toml: \[[a-z]+\]( [a-z_]+)?: [^\r\n]+", line), line


@pytest.mark.parametrize("name", ["mx.example.org", "MX1.Example.ORG", "localhost", "a", "1a.example",
                                  "x" * 63 + ".test", ".".join(["a" * 63] * 3 + ["b" * 61])])
def test_hostnames_of_rfc_1123_are_accepted(name: str) -> None:
    cfg = config.build({"server": {"hostname": name}}, "h.toml")
    assert cfg.server.hostname == name


def test_a_trailing_dot_is_dropped() -> None:
    assert config.build({"server": {"hostname": "mx.example.org."}}).server.hostname == \
        "mx.example.org"


@pytest.mark.parametrize(("name", "problem"), [
    ("mx/evil", "'/'"), ("mx:2525", "':'"), ("mx\r\n250 fake", "'\\r'"), ("mx example", "' '"),
    ("-mx.example", "hyphen"), ("mx-.example", "hyphen"), ("mx..example", "empty label"),
    ("x" * 64 + ".test", "longer than 63"), (".".join(["a" * 63] * 4), "longer than 253"),
    ("192.0.2.1", "address"), ("[192.0.2.1]", "'['"), ("mx_1.example", "'_'"), ("é.test", "'é'"),
    (".", "empty label"),
])
def test_bad_hostnames_are_one_line_naming_the_problem(name: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.build({"server": {"hostname": name}}, "h.toml")
    (line,) = exc.value.problems
    assert line.startswith("h.toml: [server] hostname: ") and problem in line, line
    assert "\n" not in line and "\r" not in line


@pytest.mark.parametrize(("section", "key"), [(s, f.name) for s, f in config.iter_keys()
                                              if f.metadata["kind"] in ("str", "hostname")])
def test_a_nul_in_any_string_is_one_line_not_a_traceback(tmp_path: Path, section: str,
                                                          key: str) -> None:
    path = tmp_path / "nul.toml"
    path.write_text(f'[{section}]\n{key} = "x\\u0000y"\n')
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"elemta: {path}:2: [{section}] {key}: "), line
