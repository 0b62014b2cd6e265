"""[delivery] relay_auth_file: the credentials the SMTP relay client gives each hop (AUTH
PLAIN or LOGIN, RFC 4954, only inside TLS), in Postfix's sasl_passwd shape:

    [hub.example.org]:587   username:password

one hop per line, the hop written as in its transport spec without "smtp:" (port 25 when left
out); the password is everything after the first colon. `#` starts a comment line.
"""

from __future__ import annotations

from .smtp import SmtpSpec, parse_smtp

Credentials = dict[SmtpSpec, tuple[str, str]]


def parse_auth(text: str, path: str) -> Credentials:
    """Raises ValueError naming path:line and the problem (never echoing a password)."""
    out: Credentials = {}
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        hop, _, secret = s.partition(" ")
        secret = secret.strip()
        user, colon, password = secret.partition(":")
        where = f"{path}:{no}"
        try:
            spec = parse_smtp(f"smtp:{hop}")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}".replace("'smtp:", "'")) from None
        if not colon or not user or not password:
            raise ValueError(f"{where}: expected \"[HOST]:PORT username:password\"")
        if spec in out:
            raise ValueError(f"{where}: {hop} is listed twice")
        out[spec] = (user, password)
    return out
