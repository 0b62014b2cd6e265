from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon import Daemon, running
from realcgroup import real_cgroup  # noqa: F401 - a fixture for every test module


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A real elemta daemon on free loopback ports with a temp maildir; killed afterwards."""
    with running(tmp_path) as d:
        yield d
