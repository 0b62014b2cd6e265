"""What the daemon builds from its Config at start: host name, worker plan, TLS context, API token,
relay credentials.

config.py only describes; the functions here touch the world (resolver, CPUs, files). The daemon
and the supervisor call them where they start; `check-config` and `serve` call `problems` first,
so that a certificate that does not load or an unsafe token file is one line naming file, key
and problem, and exit status 2, not a failure half-way through start-up.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import stat

from .config import Config, ServerConfig, TlsConfig, check_hostname, locate
from .delivery.auth import Credentials, parse_auth
from .workerplan import WorkerPlan, configured_plan, plan_workers

MIN_TOKEN_LENGTH = 16


class SetupError(Exception):
    """A configured resource cannot be used: (section, key, problem)."""

    def __init__(self, section: str, key: str, problem: str) -> None:
        super().__init__(f"[{section}] {key}: {problem}")
        self.section, self.key, self.problem = section, key, problem


@functools.cache
def _fqdn() -> str:
    # Asked once per process: getfqdn() may wait on the resolver. Forked workers inherit it.
    return socket.getfqdn()


def hostname(server: ServerConfig) -> str:
    """[server] hostname, else the host's FQDN, which must then be a host name as well."""
    if server.hostname:
        return server.hostname
    name = _fqdn()
    try:
        return check_hostname(name)
    except ValueError as exc:
        raise SetupError("server", "hostname", f"empty, and the host's own name will not do: "
                         f"{exc}; set [server] hostname") from None


def memory_limit(cfg: Config) -> int:
    """The governor's effective memory limit on this machine now: min(max_memory_usage, the
    cgroup's limit, RAM), from one sample as the governor takes it."""
    from .memory.governor import effective
    from .memory.sampler import Sampler

    sampler = Sampler()
    try:
        return effective(sampler.sample(), cfg.memory.max_memory_usage).limit
    finally:
        sampler.close()


def worker_plan(cfg: Config, limit: int | None = None) -> WorkerPlan:
    """[server] workers as a plan: a number as configured, or "auto" decided by
    workerplan.plan_workers from this process's CPUs and the memory `limit` (default: the
    governor's effective limit, sampled now)."""
    from .cpus import cpu_quota

    workers = cfg.server.workers
    if workers != "auto":
        return configured_plan(int(workers))
    return plan_workers(len(os.sched_getaffinity(0)), cpu_quota(),
                        memory_limit(cfg) if limit is None else limit)


def tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server context for STARTTLS: TLS 1.2 or newer, the system's default ciphers."""
    if not tls.certificate:
        return None
    for key in ("certificate", "key"):
        path = getattr(tls, key)
        if path and not os.access(path, os.R_OK):
            raise SetupError("tls", key, f"cannot read {path!r}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.certificate, tls.key or None)
    except (ssl.SSLError, OSError) as exc:
        raise SetupError("tls", "certificate", f"cannot load certificate/key: {exc}") from None
    return ctx


def api_token(path: str) -> bytes | None:
    """The bearer token in [api] token_file (None when unset).

    Refused when others (not owner, not group) have any access to the file, since it is a
    credential (mode 0600 or 0640), and when it is shorter than MIN_TOKEN_LENGTH
    visible ASCII characters. Surrounding white space (a final newline) is not part of it.
    """
    if not path:
        return None
    raw = _read_secret(path, "api", "token_file", 0o007, "readable by others", "chmod o-rwx",
                       4096)
    token = raw.strip()
    if len(token) < MIN_TOKEN_LENGTH or not all(0x21 <= b <= 0x7E for b in token):
        raise SetupError("api", "token_file",
                         f"{path!r}: the token must be at least {MIN_TOKEN_LENGTH} visible "
                         "ASCII characters on one line (e.g. `openssl rand -hex 32`)")
    return token


def relay_auth(path: str) -> Credentials:
    """The SMTP relay credentials of [delivery] relay_auth_file ({} when unset): a file only
    its owner may read or write (mode 0600 or 0400), since it holds passwords."""
    if not path:
        return {}
    raw = _read_secret(path, "delivery", "relay_auth_file", 0o077, "group or others have access",
                       "chmod 600", 1024 * 1024)
    try:
        return parse_auth(raw.decode("utf-8"), path)
    except (UnicodeDecodeError, ValueError) as exc:
        problem = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise SetupError("delivery", "relay_auth_file", f"{path!r}: {problem}") from None


def _read_secret(path: str, section: str, key: str, forbidden: int, exposed: str, fix: str,
                 limit: int) -> bytes:
    """A credential file's bytes: a regular file (no symlink followed) with none of the
    `forbidden` mode bits, since it holds a secret; else a SetupError naming the key."""
    def bad(problem: str) -> SetupError:
        return SetupError(section, key, f"{path!r}: {problem}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise bad(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file")
        if st.st_mode & forbidden:
            raise bad(f"{exposed} (mode {stat.S_IMODE(st.st_mode):04o}): {fix} {path}")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def problems(cfg: Config) -> list[str]:
    """Every resource of `cfg` that cannot be built, one line each ("FILE:LINE: [s] key: ...")."""
    out = []
    checks = (lambda: hostname(cfg.server), lambda: tls_context(cfg.tls),
              lambda: api_token(cfg.api.token_file),
              lambda: relay_auth(cfg.delivery.relay_auth_file))
    for check in checks:
        try:
            check()
        except SetupError as exc:
            out.append(f"{locate(cfg, exc.section, exc.key)}: {exc.problem}")
    return out
