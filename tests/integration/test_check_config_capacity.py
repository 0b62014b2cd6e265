"""check-config in a real memory cgroup: the cgroup's limit binds, and both the warning and
--explain say so the way the daemon's governor would see it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from realcgroup import MiB, join, memory_cgroup

ROOT = Path(__file__).resolve().parents[2]


def test_check_config_in_a_256_MiB_cgroup_names_the_cgroup_limit_as_binding() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with memory_cgroup(256 * MiB) as cg:
        source = f"cgroup-v{cg.version}"
        warn = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config"],
                              capture_output=True, text=True, env=env, preexec_fn=join(cg),
                              timeout=60)
        explain = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config",
                                  "--explain"], capture_output=True, text=True, env=env,
                                 preexec_fn=join(cg), timeout=60)
    assert warn.returncode == 0 and explain.returncode == 0, warn.stderr + explain.stderr
    lines = [ln for ln in warn.stderr.splitlines() if "current cgroup's memory limit" in ln]
    assert len(lines) == 1, warn.stderr
    assert f"({source}) ({256 * MiB}, 256.0 MiB) is below [memory] max_memory_usage" in lines[0]
    assert "(it binds)" in lines[0]
    assert explain.stdout.startswith(
        f"effective memory limit: {256 * MiB} bytes (256.0 MiB), source {source}"), explain.stdout
    assert "term cgroup: " in explain.stdout
