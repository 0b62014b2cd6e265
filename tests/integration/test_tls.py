"""STARTTLS with certificates generated for the test: a real handshake, TLS 1.2+, required mode."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import running

MSG = b"Subject: tls\r\n\r\nover TLS\r\n"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mx.test",
         "-addext", "subjectAltName=DNS:mx.test", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return crt, key


def client_context(crt: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(crt))
    ctx.check_hostname = False  # we connect to 127.0.0.1; the chain itself is verified
    return ctx


def test_starttls_handshake_and_delivery(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    with running(tmp_path / "d", f'[tls]\ncertificate = "{crt}"\nkey = "{key}"') as d, d.smtp() as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=client_context(crt))
        assert code == 220
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        s.sendmail("x@example.org", ["tls@example.test"], MSG)
        (path,) = d.delivered("tls@example.test")
        assert b"with ESMTPS id" in path.read_bytes()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    ctx = client_context(crt)
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with running(tmp_path / "d", f'[tls]\ncertificate = "{crt}"\nkey = "{key}"') as d, d.smtp() as s:
        s.ehlo("client.test")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            s.starttls(context=ctx)


def test_required_tls_refuses_mail_before_starttls(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    extra = f'[tls]\ncertificate = "{crt}"\nkey = "{key}"\nrequired = true'
    with running(tmp_path / "d", extra) as d, d.smtp() as s:
        s.ehlo("client.test")
        code, text = s.mail("x@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
        s.starttls(context=client_context(crt))
        s.ehlo("client.test")
        assert s.mail("x@example.org")[0] == 250


@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ('certificate = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"', "[tls] certificate: cannot read"),
        ("required = true", "[tls] required: STARTTLS required but no certificate"),
        ('certificate = "{key}"\nkey = "{key}"', "[tls] certificate: cannot load certificate/key"),
    ],
)
def test_bad_tls_config_is_exit_2(tmp_path: Path, cert: tuple[Path, Path], tls: str, needle: str) -> None:
    _, key = cert
    path = tmp_path / "bad.toml"
    path.write_text("[tls]\n" + tls.replace("{key}", str(key)) + "\n")
    out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert needle in out.stderr, out.stderr
