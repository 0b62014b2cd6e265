"""Fake /proc and /sys/fs/cgroup trees in a temp dir, for the readers' edge cases."""

from __future__ import annotations

from pathlib import Path

from elemta.memory.sampler import PAGE_SIZE

MiB = 1024 * 1024
V1_SENTINEL = "9223372036854771712"

MOUNTS_HYBRID = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
MOUNTS_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
MOUNTS_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(root: Path, cgroup: str, mountinfo: str, rss: int = 40 * MiB,
         total_kib: int = 16 * 1024 * 1024, avail_kib: int = 12 * 1024 * 1024) -> None:
    write(root / "proc/self/cgroup", cgroup)
    write(root / "proc/self/mountinfo", mountinfo)
    write(root / "proc/self/statm", f"100000 {rss // PAGE_SIZE} 500 1 0 900 0\n")
    write(root / "proc/meminfo", f"MemTotal:       {total_kib} kB\nMemFree:  1 kB\n"
          f"MemAvailable:   {avail_kib} kB\n")
    write(root / "proc/pressure/memory", "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n"
          "full avg10=0.25 avg60=0.00 avg300=0.00 total=678\n")


# `clean` is the page cache the kernel can drop (elemta's reclaimable_file): the stat files add
# dirty, writeback, shmem and mapped pages on top of it, which are not reclaimable, and put the
# file pages on the active list, which must not matter.
def v1_group(d: Path, usage: int, limit: str, clean: int, hier: str | None = None) -> None:
    write(d / "memory.usage_in_bytes", f"{usage}\n")
    write(d / "memory.limit_in_bytes", f"{limit}\n")
    write(d / "memory.failcnt", "7\n")
    write(d / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    mib = 1 << 20
    write(d / "memory.stat", f"cache {clean // 2}\ninactive_file 0\n"
          f"hierarchical_memory_limit {hier or limit}\ntotal_cache {clean + 4 * mib}\n"
          f"total_dirty {mib}\ntotal_writeback {mib}\ntotal_shmem {mib}\n"
          f"total_mapped_file {mib}\ntotal_active_file {clean + 4 * mib}\n"
          "total_inactive_file 0\n")


def v2_group(d: Path, current: int, maximum: str, clean: int, high: str = "max") -> None:
    write(d / "memory.current", f"{current}\n")
    write(d / "memory.max", f"{maximum}\n")
    write(d / "memory.high", f"{high}\n")
    mib = 1 << 20
    write(d / "memory.stat", f"anon 5\nfile {clean + 4 * mib}\nfile_dirty {mib}\n"
          f"file_writeback {mib}\nshmem {mib}\nfile_mapped {mib}\n"
          f"inactive_file 0\nactive_file {clean + 4 * mib}\n")
    write(d / "memory.events", "low 0\nhigh 4\nmax 3\noom 1\noom_kill 1\n")
    write(d / "memory.pressure", "some avg10=9.00 avg60=0.00 avg300=0.00 total=99\n"
          "full avg10=4.00 avg60=0.00 avg300=0.00 total=44\n")
