"""cgroup readers and the sampler over fake /proc + /sys trees (edge cases the host cannot show)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fakecgroup import MOUNTS_HYBRID, MOUNTS_V1, MOUNTS_V2, V1_SENTINEL, MiB, proc, v1_group, v2_group, write

from elemta.memory.cgroup import (
    CgroupReader,
    CgroupUnavailable,
    ancestors,
    locate,
    parse_limit,
    parse_mountinfo,
    parse_pressure,
    parse_proc_cgroup,
    reclaimable_file,
)
from elemta.memory.sampler import PAGE_SIZE, Sampler

# -- pure parsers -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("max\n", None),
    (V1_SENTINEL + "\n", None),
    ("9223372036854710272\n", None),  # the v1 sentinel on 64 KiB pages
    ("268435456\n", 268435456),
    ("0\n", 0),
])
def test_parse_limit(text: str, expected: int | None) -> None:
    assert parse_limit(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("4:memory:/a/b\n0::/\n", ("/a/b", "/")),
    ("0::/system.slice/elemta.service\n", (None, "/system.slice/elemta.service")),
    ("5:cpu,memory:/x\n", ("/x", None)),
    ("3:cpuset:/\n", (None, None)),
])
def test_parse_proc_cgroup(text: str, expected: tuple[str | None, str | None]) -> None:
    assert parse_proc_cgroup(text) == expected


def test_parse_mountinfo_unescapes_and_reads_super_options() -> None:
    mounts = parse_mountinfo("35 31 0:32 /ns /sys/fs/my\\040cg rw - cgroup cgroup rw,memory\n")
    assert len(mounts) == 1
    m = mounts[0]
    assert (m.root, m.mountpoint, m.fstype) == ("/ns", "/sys/fs/my cg", "cgroup")
    assert "memory" in m.super_options


def test_parse_pressure() -> None:
    p = parse_pressure("some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n"
                       "full avg10=0.25 avg60=0.00 avg300=0.00 total=678\n")
    assert (p.some_avg10, p.full_avg10, p.some_total_us, p.full_total_us) == (1.5, 0.25, 12345, 678)


# -- locating and reading ----------------------------------------------------------------------------

def test_hybrid_uses_v1_memory_controller(tmp_path: Path) -> None:
    proc(tmp_path, "4:memory:/svc/elemta\n1:cpu:/\n0::/\n", MOUNTS_HYBRID)
    write(tmp_path / "sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n")
    base = tmp_path / "sys/fs/cgroup/memory"
    v1_group(base / "svc/elemta", usage=300 * MiB, limit=str(256 * MiB), clean=100 * MiB)
    write(base / "svc/memory.limit_in_bytes", V1_SENTINEL)
    write(base / "memory.limit_in_bytes", V1_SENTINEL)
    loc = locate(tmp_path)
    assert loc.version == 1
    assert loc.directory == base / "svc/elemta"
    assert ancestors(loc) == [base / "svc/elemta", base / "svc", base]
    figures = CgroupReader(loc).read()
    assert figures.limit == 256 * MiB
    assert figures.current == 300 * MiB
    assert figures.working_set == 200 * MiB  # total_* figures, not the cgroup's own
    assert figures.events == {"failcnt": 7, "oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2}


def test_v1_parent_holds_lower_limit(tmp_path: Path) -> None:
    proc(tmp_path, "4:memory:/a/b/c\n", MOUNTS_V1)
    base = tmp_path / "sys/fs/cgroup/memory"
    # The leaf is unlimited and says so in hierarchical_memory_limit too (use_hierarchy off);
    # the walk up still finds the grandparent's limit.
    v1_group(base / "a/b/c", usage=10 * MiB, limit=V1_SENTINEL, clean=0, hier=V1_SENTINEL)
    write(base / "a/b/memory.limit_in_bytes", str(512 * MiB))
    write(base / "a/memory.limit_in_bytes", str(128 * MiB))
    write(base / "memory.limit_in_bytes", V1_SENTINEL)
    assert CgroupReader(locate(tmp_path)).read().limit == 128 * MiB


def test_v1_unlimited_everywhere(tmp_path: Path) -> None:
    proc(tmp_path, "4:memory:/a\n", MOUNTS_V1)
    base = tmp_path / "sys/fs/cgroup/memory"
    v1_group(base / "a", usage=10 * MiB, limit=V1_SENTINEL, clean=MiB)
    write(base / "memory.limit_in_bytes", V1_SENTINEL)
    figures = CgroupReader(locate(tmp_path)).read()
    assert figures.limit is None
    assert figures.working_set == 9 * MiB


def test_v2_leaf_max_and_parent_high(tmp_path: Path) -> None:
    proc(tmp_path, "0::/system.slice/elemta.service\n", MOUNTS_V2)
    base = tmp_path / "sys/fs/cgroup"
    write(base / "cgroup.controllers", "cpuset cpu io memory pids\n")
    v2_group(base / "system.slice/elemta.service", current=80 * MiB, maximum=str(1024 * MiB),
             clean=30 * MiB)
    write(base / "system.slice/memory.max", "max\n")
    write(base / "system.slice/memory.high", str(600 * MiB))
    loc = locate(tmp_path)
    assert loc.version == 2
    reader = CgroupReader(loc)
    figures = reader.read()
    assert figures.limit == 600 * MiB
    assert figures.working_set == 50 * MiB
    assert figures.events["oom_kill"] == 1
    assert reader.pressure_path == base / "system.slice/elemta.service/memory.pressure"


def test_v2_max_is_unlimited(tmp_path: Path) -> None:
    proc(tmp_path, "0::/u\n", MOUNTS_V2)
    base = tmp_path / "sys/fs/cgroup"
    write(base / "cgroup.controllers", "memory\n")
    v2_group(base / "u", current=5 * MiB, maximum="max", clean=0)
    assert CgroupReader(locate(tmp_path)).read().limit is None


def test_v2_without_memory_controller_is_unavailable(tmp_path: Path) -> None:
    proc(tmp_path, "0::/\n", MOUNTS_HYBRID)
    write(tmp_path / "sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n")
    with pytest.raises(CgroupUnavailable, match="memory controller"):
        locate(tmp_path)


def test_namespaced_mount_root(tmp_path: Path) -> None:
    # Inside a container the memory hierarchy's /docker/abc is mounted at the mount point.
    proc(tmp_path, "4:memory:/docker/abc/inner\n",
         "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    base = tmp_path / "sys/fs/cgroup/memory"
    v1_group(base / "inner", usage=MiB, limit=str(64 * MiB), clean=0)
    assert locate(tmp_path).directory == base / "inner"


# -- the sampler's fallback --------------------------------------------------------------------------

def test_missing_cgroup_files_fall_back_with_one_warning(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    proc(tmp_path, "4:memory:/gone\n", MOUNTS_V1, rss=42 * MiB)
    (tmp_path / "sys/fs/cgroup/memory").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="elemta.memory"):
        sampler = Sampler(tmp_path)
        samples = [sampler.sample() for _ in range(3)]
    assert all(s.cgroup is None for s in samples)
    assert samples[0].process_rss == 42 * MiB // PAGE_SIZE * PAGE_SIZE
    assert samples[0].host_total == 16 * 1024 * 1024 * 1024
    assert samples[0].pressure is not None and samples[0].pressure.some_total_us == 12345
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "memory.usage_in_bytes" in warnings[0].getMessage()


def test_files_vanishing_later_fall_back_with_one_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    proc(tmp_path, "4:memory:/a\n", MOUNTS_V1)
    d = tmp_path / "sys/fs/cgroup/memory/a"
    v1_group(d, usage=10 * MiB, limit=str(64 * MiB), clean=0)
    sampler = Sampler(tmp_path)
    assert sampler.sample().cgroup is not None
    # Unreadable content (as after the cgroup was removed under us) must not crash sampling.
    write(d / "memory.usage_in_bytes", "garbage\n")
    with caplog.at_level(logging.WARNING, logger="elemta.memory"):
        assert sampler.sample().cgroup is None
        assert sampler.sample().cgroup is None
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_no_proc_cgroup_at_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "proc").mkdir()
    with caplog.at_level(logging.WARNING, logger="elemta.memory"):
        sample = Sampler(tmp_path).sample()
    assert sample.cgroup is None
    assert sample.process_rss > 0  # falls back to this process's real RSS
    assert sample.host_total > 0
    assert len(caplog.records) == 1


@pytest.mark.skipif(not Path("/proc/self/cgroup").exists(), reason="needs Linux /proc")
def test_real_host_sample_is_consistent() -> None:
    sampler = Sampler()
    sample = sampler.sample()
    assert sample.host_available <= sample.host_total
    assert 0 < sample.process_rss < sample.host_total
    if sample.cgroup is not None:
        assert sample.cgroup.working_set <= sample.cgroup.current
    statm_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(sample.process_rss - statm_rss) < 64 * MiB


@pytest.mark.parametrize("version", [1, 2])
def test_reclaimable_file_is_clean_unmapped_page_cache(version: int) -> None:
    names = {2: ("file", "file_dirty", "file_writeback", "shmem", "file_mapped", "active_file"),
             1: ("total_cache", "total_dirty", "total_writeback", "total_shmem",
                 "total_mapped_file", "total_active_file")}[version]
    file, dirty, writeback, shmem, mapped, active = names
    stat = {file: 100 * MiB, dirty: 10 * MiB, writeback: 5 * MiB, shmem: 20 * MiB,
            mapped: 15 * MiB, active: 100 * MiB}
    assert reclaimable_file(stat, version) == 50 * MiB  # active or not does not matter
    assert reclaimable_file({file: MiB, dirty: 2 * MiB}, version) == 0
    assert reclaimable_file({}, version) == 0
