"""AUTH from the relay client (relay_auth_file) to a hop that requires it inside TLS: an
aiosmtpd server (the SMTP library elemta itself is built on) with STARTTLS and AUTH PLAIN/LOGIN,
recording what it was given."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from test_smtp_relay import at, relay_extra, states
from test_smtp_relay_tls import cert  # noqa: F401 - a fixture

from daemon import free_port, running, wait_until

USER, PASSWORD = "edge", "s3cr:et pass"


class Hop:
    def __init__(self) -> None:
        self.logins: list[tuple[str, str, str]] = []  # (mechanism, user, password)
        self.messages: list[tuple[str, list[str]]] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        user, password = data.login.decode(), data.password.decode()
        self.logins.append((mechanism, user, password))
        # handled=False: aiosmtpd then answers a failure with 535 itself (True: says nothing).
        return AuthResult(success=(user, password) == (USER, PASSWORD), handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


def serve(cert_pair: tuple[Path, Path], exclude: list[str]) -> tuple[Controller, Hop]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*map(str, cert_pair))
    hop = Hop()
    c = Controller(hop, hostname="127.0.0.1", port=free_port(), server_hostname="hop.test",
                   tls_context=ctx, require_starttls=True, auth_require_tls=True,
                   auth_required=True, authenticator=hop.authenticate,
                   auth_exclude_mechanism=exclude)
    c.start()
    return c, hop


def auth_file(tmp_path: Path, port: int, password: str = PASSWORD, mode: int = 0o600) -> Path:
    p = tmp_path / "relay_auth"
    p.write_text(f"# hop\n[127.0.0.1]:{port}  {USER}:{password}\n")
    p.chmod(mode)
    return p


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_inside_tls(tmp_path: Path, cert: tuple[Path, Path], mechanism: str) -> None:  # noqa: F811
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    c, hop = serve(cert, exclude=[other])
    try:
        extra = relay_extra(tmp_path, c.port, f'smtp_tls = "may"\nrelay_auth_file = '
                                              f'"{auth_file(tmp_path, c.port)}"\n')
        with running(tmp_path / "edge", extra) as e:
            e.send([at("alice")], b"Subject: auth\r\n\r\nx\r\n", sender="s@example.org")
            wait_until(lambda: "status=sent" in e.log, "relayed")
        assert hop.logins == [(mechanism, USER, PASSWORD)]
        assert hop.messages == [("s@example.org", [at("alice")])]
        assert PASSWORD not in e.log
    finally:
        c.stop()


def test_wrong_password_defers(tmp_path: Path, cert: tuple[Path, Path]) -> None:  # noqa: F811
    c, hop = serve(cert, exclude=[])
    try:
        extra = relay_extra(tmp_path, c.port, f'smtp_tls = "may"\nrelay_auth_file = '
                                              f'"{auth_file(tmp_path, c.port, "wrong")}"\n')
        with running(tmp_path / "edge", extra) as e:
            e.send([at("alice")], b"Subject: auth\r\n\r\nx\r\n")
            wait_until(lambda: "status=deferred" in e.log, "deferred")
            assert (f"(451 4.7.0 SASL authentication to hop.test[127.0.0.1]:{c.port} failed: "
                    "535 5.7.8 Authentication credentials invalid)") in e.log
            wait_until(lambda: set(states(tmp_path / "queue").values()) == {"pending"},
                       "still pending")
        assert hop.messages == []
    finally:
        c.stop()


def test_auth_file_readable_by_others_is_a_config_error(tmp_path: Path) -> None:
    p = auth_file(tmp_path, 25, mode=0o644)
    extra = relay_extra(tmp_path, 25, f'relay_auth_file = "{p}"\n')
    conf = tmp_path / "elemta.toml"
    from daemon import write_config
    write_config(tmp_path, free_port(), free_port(), extra)
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config",
                          str(conf)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert (f"[delivery] relay_auth_file: '{p}': group or others have access (mode 0644): "
            f"chmod 600 {p}") in out.stderr, out.stderr
    assert PASSWORD not in out.stderr
    os.chmod(p, 0o600)
    ok = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config",
                         str(conf)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
