"""Find the load at which elemta starts answering 452 under a given memory limit (README).

    sudo .venv/bin/python bench/find_452.py [--limit 160MiB] [--steps 25,50,100,200,400]

Starts a daemon in a fresh real memory cgroup with that limit (the MemoryMax= of a unit; v1 or
v2, tests/realcgroup.py), then runs `elemta loadtest` at each step of concurrent sessions (1 MiB
messages, 2 per session, --api for the daemon's memory), printing each final table. The first
step whose table shows 452 replies is the load the limit holds no more.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemon import running
from elemta.units import parse_size
from realcgroup import join, memory_cgroup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", default="160MiB")
    ap.add_argument("--steps", default="25,50,100,200,400")
    ap.add_argument("--size", default="1MiB")
    args = ap.parse_args()
    limit = parse_size(args.limit)
    with TemporaryDirectory() as tmp, memory_cgroup(limit) as cg, \
            running(Path(tmp), preexec_fn=join(cg)) as d:
        print(f"daemon in a cgroup v{cg.version} with a {args.limit} limit "
              f"(the unit's MemoryMax=), max_memory_usage default (2 GiB)", flush=True)
        for n in (int(s) for s in args.steps.split(",")):
            out = subprocess.run(
                [sys.executable, "-m", "elemta.cli", "loadtest", f"127.0.0.1:{d.port}",
                 "-n", str(n), "-m", "2", "--count", str(2 * n), "--size", args.size,
                 "--api", f"http://127.0.0.1:{d.api_port}", "--to", "user@example.test"],
                capture_output=True, text=True, timeout=600)
            alive = d.proc.poll() is None
            out.stdout += (f"  cgroup         oom_kill {cg.oom_kills()}, daemon "
                           + ("running" if alive else f"exited ({d.proc.returncode})") + "\n")
            sys.stdout.write(f"\n$ elemta loadtest 127.0.0.1:{d.port} -n {n} -m 2 --count "
                             f"{2 * n} --size {args.size} --api http://127.0.0.1:"
                             f"{d.api_port}\n" + out.stdout)
            sys.stdout.flush()
            if not alive:
                print("\n".join(d.log.splitlines()[-5:]))
                break


if __name__ == "__main__":
    main()
