"""STARTTLS from the relay client to the next hop (elemta with a certificate made for the
test): "encrypt" verifies the certificate and defers, never sending in clear, when it cannot;
"may" encrypts without verifying."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_smtp_relay import at, relay_extra, states

from daemon import Daemon, running, wait_until


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=hop.test", "-addext", "subjectAltName=DNS:hop.test,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def hop(tmp_path: Path, cert: tuple[Path, Path] | None) -> str:
    tls = f'[tls]\ncertificate = "{cert[0]}"\nkey = "{cert[1]}"\n' if cert else ""
    return (f'[server]\nhostname = "hop.test"\n[delivery]\ndomains = ["relay.test"]\n'
            f'recipients = "any"\n{tls}')


def edge(tmp_path: Path, port: int, tls: str) -> str:
    return relay_extra(tmp_path / "edge", port, tls)


def stored(h: Daemon, user: str) -> bytes:
    wait_until(lambda: h.delivered(at(user)), f"the hop stores {user}'s copy")
    [f] = h.delivered(at(user))
    return f.read_bytes()


def test_encrypt_with_the_hops_ca_delivers_over_tls(tmp_path: Path,
                                                    cert: tuple[Path, Path]) -> None:
    with running(tmp_path / "hop", hop(tmp_path, cert)) as h, \
            running(tmp_path / "edge", edge(tmp_path, h.port, f'smtp_tls = "encrypt"\n'
                                            f'smtp_tls_ca_file = "{cert[0]}"\n')) as e:
        e.send([at("alice")], b"Subject: secret\r\n\r\nx\r\n")
        assert b"by hop.test (elemta" in (copy := stored(h, "alice"))
        assert b"with ESMTPS id" in copy  # the hop's Received: says TLS


def test_encrypt_with_an_untrusted_certificate_defers_and_sends_nothing(
        tmp_path: Path, cert: tuple[Path, Path]) -> None:
    with running(tmp_path / "hop", hop(tmp_path, cert)) as h, \
            running(tmp_path / "edge", edge(tmp_path, h.port, 'smtp_tls = "encrypt"\n')) as e:
        e.send([at("alice")], b"Subject: secret\r\n\r\nx\r\n")
        wait_until(lambda: "status=deferred" in e.log, "deferred")
        assert (f"(451 4.7.5 TLS handshake with hop.test[127.0.0.1]:{h.port}: server "
                "certificate not trusted: self-signed certificate)") in e.log
        wait_until(lambda: set(states(tmp_path / "edge" / "queue").values()) == {"pending"},
                   "the recipient stays pending")
        assert h.delivered(at("alice")) == [] and "queued " not in h.log


def test_encrypt_to_a_hop_without_starttls_defers(tmp_path: Path) -> None:
    with running(tmp_path / "hop", hop(tmp_path, None)) as h, \
            running(tmp_path / "edge", edge(tmp_path, h.port, 'smtp_tls = "encrypt"\n')) as e:
        e.send([at("alice")], b"Subject: secret\r\n\r\nx\r\n")
        wait_until(lambda: "status=deferred" in e.log, "deferred")
        assert (f"(451 4.7.5 TLS is required, but hop.test[127.0.0.1]:{h.port} does not offer "
                "STARTTLS)") in e.log
        assert h.delivered(at("alice")) == []


def test_may_encrypts_without_verifying(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    with running(tmp_path / "hop", hop(tmp_path, cert)) as h, \
            running(tmp_path / "edge", edge(tmp_path, h.port, 'smtp_tls = "may"\n')) as e:
        e.send([at("alice")], b"Subject: opportunistic\r\n\r\nx\r\n")
        assert b"with ESMTPS id" in stored(h, "alice")


def test_none_stays_in_clear(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    with running(tmp_path / "hop", hop(tmp_path, cert)) as h, \
            running(tmp_path / "edge", edge(tmp_path, h.port, 'smtp_tls = "none"\n')) as e:
        e.send([at("alice")], b"Subject: clear\r\n\r\nx\r\n")
        copy = stored(h, "alice")
        assert b"with ESMTP id" in copy and b"ESMTPS" not in copy

