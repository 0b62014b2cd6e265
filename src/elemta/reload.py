"""SIGHUP: re-read the configuration file; decide what applies live and what needs a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import config, mailboxes, runtime
from .events import emit
from .recipients import MapError, RecipientMap, Recipients, load_delivery_map

if TYPE_CHECKING:
    from .observe.systemd import SystemdNotifier

log = logging.getLogger("elemta.reload")

# Keys bound into objects built at start-up (sockets, the store, the log handler): a change is
# reported as "needs a restart" and the running value stays in force until then.
RESTART_ONLY = (
    ("server", "listen"),
    ("server", "hostname"),
    ("server", "workers"),
    ("server", "pin_workers"),
    ("server", "event_loop"),
    ("delivery", "maildir_root"),
    ("delivery", "queue_dir"),
    # Bound into each SMTP hop's client when it is first built.
    ("delivery", "smtp_connect_timeout"),
    ("delivery", "smtp_command_timeout"),
    ("delivery", "smtp_data_init_timeout"),
    ("delivery", "smtp_data_xfer_timeout"),
    ("delivery", "smtp_data_done_timeout"),
    ("delivery", "smtp_tls"),
    ("delivery", "smtp_tls_ca_file"),
    ("delivery", "relay_auth_file"),
    ("api", "listen"),
    ("api", "enable_profiling"),
    ("logging", "format"),
    ("tls", "certificate"),
    ("tls", "key"),
    ("tls", "required"),
)


@dataclass(frozen=True)
class ReloadOutcome:
    path: str
    config: config.Config | None  # the config to run with from now on; None: rejected, keep the old
    problems: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # "section.key" that now take effect
    needs_restart: tuple[str, ...] = ()  # "section.key" changed in the file but not applied


def _path_of(current: config.Config) -> str | None:
    return None if current.source == config.Config().source else current.source


def diff(old: config.Config, new: config.Config) -> list[str]:
    """Every "section.key" whose value differs."""
    out = []
    for section, f in config.iter_keys():
        if getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name):
            out.append(f"{section}.{f.name}")
    return out


def merge(old: config.Config, new: config.Config) -> config.Config:
    """`new`, except that restart-only keys keep their running value from `old`."""
    sections = {}
    for section in config.SECTIONS:
        keep = {k: getattr(getattr(old, section), k) for s, k in RESTART_ONLY if s == section}
        sections[section] = dataclasses.replace(getattr(new, section), **keep)
    return config.Config(**sections, source=new.source)


def reload_config(current: config.Config,
                  shape: Callable[[config.Config], config.Config] = lambda c: c) -> ReloadOutcome:
    """Load the file again. `shape` turns it into what this process runs (a worker's share of
    the caps), so that only keys the administrator changed are reported as changed."""
    path = _path_of(current)
    shown = path or str(config.DEFAULT_CONFIG_PATH)
    try:
        new = config.load(path)
    except config.ConfigError as exc:
        return ReloadOutcome(shown, None, tuple(exc.problems))
    problems = runtime.problems(new)  # a certificate or token file that would not load
    if problems:
        return ReloadOutcome(shown, None, tuple(problems))
    new = shape(new)
    changes = diff(current, new)
    restart = tuple(c for c in changes if tuple(c.split(".", 1)) in RESTART_ONLY)
    live = tuple(c for c in changes if c not in restart)
    return ReloadOutcome(new.source, merge(current, new), (), live, restart)


def log_rejected(logger: logging.Logger, outcome: ReloadOutcome) -> None:
    """The config_reloaded event for a file that failed validation: the old config stays."""
    emit(logger, "config_reloaded",
         f"configuration reload rejected, old configuration stays in force: "
         f"{'; '.join(outcome.problems)}",
         config_path=outcome.path, result="rejected")


def read_recipients(delivery: config.DeliveryConfig) -> RecipientMap | Exception:
    """SIGHUP, off the event loop: re-read the recipient maps and aliases (even when their paths
    did not change). config.load has just parsed both files; a failure here means they changed
    in between."""
    try:
        return load_delivery_map(delivery)
    except (OSError, MapError, UnicodeDecodeError) as exc:
        return exc


def reload_recipients(recipients: Recipients, delivery: config.DeliveryConfig,
                      loaded: RecipientMap | Exception, root: Path, executor: Executor) -> None:
    """Put the maps read_recipients read in force; after a failure the maps in force stay.
    Postmaster mailboxes of newly added domains are made off the loop."""
    if isinstance(loaded, Exception):
        log.error("recipient map not re-read, the previous one stays: %s", loaded)
    else:
        recipients.install(loaded, delivery)
        log.info("recipient map re-read: %s", recipients.map.description)
    executor.submit(mailboxes.ensure_postmasters, root, delivery.domains)


class Reloads:
    """SIGHUP, for the daemon and the supervisor: each signal starts one reload task; they run
    one after another, in the order signalled, with RELOADING=1 / READY=1 around each.

    `apply` reads and parses the files on an executor thread (reload_config and
    read_recipients do I/O and, for a large recipient map, seconds of parsing); the event
    loop goes on serving meanwhile.
    """

    def __init__(self, systemd: SystemdNotifier, apply: Callable[[], Awaitable[None]]) -> None:
        self._systemd = systemd
        self._apply = apply
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def signalled(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run(), name="elemta-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        async with self._lock:
            self._systemd.reloading()
            try:
                await self._apply()
            finally:
                self._systemd.reloaded()

    async def cancel(self) -> None:
        """At stop: a reload still parsing its files is moot."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
