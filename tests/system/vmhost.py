"""The VM for tests driven from the host (power.py, flood.py): boot it, read what it reports.

The guest side is guest-serve.sh: it installs the .deb at the first boot, reports over the second
serial port (a file here) and says READY once SMTP is reachable through qemu's user-mode network:
a loopback port here forwarded to the guest's port 25 (and, in flood mode, to its control port).
qemu is started through qemu.sh, the system test's one command line.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOT_TIMEOUT = 600.0  # boot (and, the first time, install) until READY; emulation on a shared machine
CONTROL_PORT = 7000  # guest-serve.sh's control server (flood mode)


class CannotRun(Exception):
    """This machine cannot boot the VM (printed as a SKIP, exit 77)."""


@dataclass
class Report:
    """What guest-serve.sh printed on the second serial port up to READY."""

    boot: str = ""
    installed: str = ""
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (seq, sha, size): new/, cur/
    tmp: list[str] = field(default_factory=list)
    tmp_at_start: list[str] = field(default_factory=list)  # "size name", before elemta's clean-up
    cleaned: int = 0


def parse_report(lines: list[str]) -> Report:
    out = Report()
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "BOOT":
            out.boot = rest
        elif word == "INSTALLED":
            out.installed = rest
        elif word == "M":
            seq, sha, size = rest.split()
            out.files.append((seq, sha, int(size)))
        elif word == "T":
            out.tmp.append(rest)
        elif word == "S":
            out.tmp_at_start.append(rest)
        elif word == "CLEANED":
            out.cleaned = int(rest)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(deb: Path, release: str, mode: str) -> tuple[Path, Path]:
    """(base image directory, fresh work directory holding root.raw and io.img).

    CannotRun when qemu or the image cannot be had here.
    """
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise CannotRun(f"{tool} missing (apt-get install qemu-system-x86 qemu-utils e2fsprogs)")
    built = subprocess.run([str(HERE / "build-image.sh"), release], stdout=subprocess.PIPE, text=True)
    if built.returncode != 0:
        raise CannotRun("cannot build the VM base image (needs root and a Debian mirror)")
    image = Path(built.stdout.strip())
    work = Path(tempfile.mkdtemp(prefix=f"elemta-{mode}."))
    inputs = work / "in"
    inputs.mkdir()
    shutil.copy(deb, inputs)
    shutil.copy(HERE / "guest-serve.sh", inputs / "run.sh")
    (inputs / "run.sh").chmod(0o755)
    (inputs / "mode").write_text(mode + "\n")
    # Sparse: the flood's Maildir lives there (guest-serve.sh), a few GiB.
    size = "8G" if mode == "flood" else "64M"
    subprocess.run(["truncate", "-s", size, str(work / "io.img")], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "elemta-io", "-d", str(inputs), str(work / "io.img")],
                   check=True)
    # A raw copy, not a qcow2 overlay: qemu's NVMe device ignores the FUA bit of a write
    # (hw/nvme/ctrl.c, nvme_do_write), and Linux trusts FUA on NVMe, so ext4's journal commit
    # block, written with FUA and no flush after it, could land in a qcow2 cluster whose mapping
    # was still only in qemu's memory at the SIGKILL: the commit, and with it the renames of
    # mail already answered 250, gone though fsync had returned (trixie, twice: the message in
    # neither tmp/ nor new/). A raw file has no such metadata; the copy is sparse (0.5 s).
    subprocess.run(["cp", "--sparse=always", str(image / "base.raw"), str(work / "root.raw")],
                   check=True)
    return image, work


class Vm:
    """One boot of the VM (disk cache mode `cache`, see qemu.sh), its serial report read as it
    arrives. `port` leads to the guest's SMTP port, `control_port` to its control server."""

    def __init__(self, image: Path, work: Path, boot: int, cache: str = "none") -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.serial = work / f"serial-{boot}.txt"
        self.console = work / f"console-{boot}.log"
        self.serial.touch()
        fwd = (f"hostfwd=tcp:127.0.0.1:{self.port}-:25,"
               f"hostfwd=tcp:127.0.0.1:{self.control_port}-:{CONTROL_PORT}")
        self.proc = subprocess.Popen(
            [str(HERE / "qemu.sh"), str(image), str(work / "root.raw"), str(work / "io.img"),
             str(self.console), cache,
             "-nic", f"user,model=virtio-net-pci,restrict=on,{fwd}",
             "-serial", f"file:{self.serial}"],
            stdin=subprocess.DEVNULL)

    def wait_ready(self) -> Report:
        """The guest's report once it says READY; RuntimeError if it fails or never does."""
        end = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < end:
            lines = self.serial.read_text(errors="replace").replace("\r", "").split("\n")
            done = [ln for ln in lines[:-1] if ln.startswith(("READY", "FAIL"))]
            if done:
                if done[0].startswith("FAIL"):
                    raise RuntimeError(f"guest: {done[0]}")
                return parse_report(lines[:-1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited ({self.proc.returncode}) before READY")
            time.sleep(0.5)  # polling a file qemu appends to; there is no event to wait on
        raise RuntimeError(f"no READY within {BOOT_TIMEOUT:.0f}s")

    def kill(self) -> None:
        """SIGKILL to qemu itself (qemu.sh execs it): for the guest, a power cut."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def console_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
