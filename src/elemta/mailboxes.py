"""Mailboxes made and listed by the administrator (`elemta mailbox`) and at start (postmaster).

Blocking file-system work: the CLI calls it directly, the daemon before it serves or in an
executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .recipients import LOCALPART, POSTMASTER
from .store.maildir import Mailbox, fsync_dir, mailbox_path

log = logging.getLogger("elemta.mailboxes")
DIR_MODE = 0o700
SUBDIRS = ("tmp", "new", "cur")


def _owner(path: Path) -> tuple[int, int]:
    """uid and gid of `path`, or of its nearest existing ancestor."""
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return os.getuid(), os.getgid()  # pragma: no cover - "/" always exists


def create(root: Path, box: Mailbox) -> bool:
    """Make <root>/<domain>/<localpart>/{tmp,new,cur} (0700), durably; False if it existed.

    Run as root (`elemta mailbox add` by an administrator), every new directory is given to
    the owner of maildir_root (or of its nearest existing ancestor), the service user under
    the package, so the daemon can deliver into it.
    """
    base = mailbox_path(root, box)
    owner = _owner(root) if os.geteuid() == 0 else None
    missing = []
    up = root
    while not up.exists():  # maildir_root and parents, on the very first run
        missing.append(up)
        up = up.parent
    created: list[Path] = []
    for path in (*reversed(missing), base.parent, base, *(base / s for s in SUBDIRS)):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask
        if owner is not None:
            os.chown(path, *owner)
        created.append(path)
    # A new directory entry is durable once its parent directory is synced.
    for parent in dict.fromkeys(p.parent for p in created):
        fsync_dir(parent)
    return base in created


def ensure_postmasters(root: Path, domains: Iterable[str]) -> None:
    """postmaster@ every domain exists (RFC 5321 4.5.1 wants it reachable) from the first start.

    A failure is logged, not fatal: DATA answers 452 4.3.1 until the tree is writable.
    """
    try:
        made = [box for box in (Mailbox(d, POSTMASTER) for d in domains) if create(root, box)]
    except OSError as exc:
        log.error("cannot create the postmaster mailboxes under %s: %s", root, exc.strerror or exc)
        return
    if made:
        log.info("created mailbox(es) %s", ", ".join(str(b) for b in made))


def count_messages(root: Path, box: Mailbox) -> int:
    base = mailbox_path(root, box)
    total = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for e in os.scandir(base / sub) if e.is_file(follow_symlinks=False))
    return total


def existing(root: Path, domains: Iterable[str]) -> Iterator[Mailbox]:
    """Every mailbox of our domains under `root`: domains in config order, names sorted."""
    for domain in domains:
        try:
            names = sorted(e.name for e in os.scandir(root / domain) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if LOCALPART.fullmatch(name):
                yield Mailbox(domain, name)
