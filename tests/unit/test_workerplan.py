"""workers = "auto": the pure decision from CPUs, CPU quota, memory limit and worker baseline."""

from __future__ import annotations

import pytest

from elemta.workerplan import MAX_WORKERS, MEMORY_SHARE, WORKER_BASELINE, plan_workers

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_many_cpus_with_a_2_gib_budget_are_capped_by_memory() -> None:
    plan = plan_workers(cpus=64, quota=None, limit=2 * GiB, baseline=30 * MiB)
    # 25% of 2 GiB = 512 MiB; 512 / 30 = 17.07: not 64 workers of ~30 MiB each.
    assert (plan.count, plan.usable_cpus, plan.memory_cap) == (17, 64, 17)
    assert plan.binding == "memory"
    assert plan.count * 30 * MiB <= MEMORY_SHARE * 2 * GiB


def test_one_cpu_is_one_worker() -> None:
    plan = plan_workers(cpus=1, quota=None, limit=2 * GiB, baseline=30 * MiB)
    assert (plan.count, plan.binding) == (1, "cpus")


def test_a_fractional_quota_is_rounded_up() -> None:
    plan = plan_workers(cpus=8, quota=1.5, limit=2 * GiB, baseline=30 * MiB)
    assert (plan.count, plan.usable_cpus, plan.binding) == (2, 2, "cpus")


def test_a_quota_below_one_cpu_is_one_worker() -> None:
    assert plan_workers(cpus=4, quota=0.2, limit=2 * GiB, baseline=30 * MiB).count == 1


def test_a_tiny_limit_still_gives_one_worker() -> None:
    plan = plan_workers(cpus=16, quota=None, limit=64 * MiB, baseline=30 * MiB)
    assert (plan.count, plan.memory_cap, plan.binding) == (1, 1, "memory")


def test_the_cpus_of_this_machine_with_the_default_budget() -> None:
    plan = plan_workers(cpus=2, quota=None, limit=2 * GiB, baseline=WORKER_BASELINE)
    assert (plan.count, plan.binding) == (2, "cpus")


def test_never_more_than_the_configurable_maximum() -> None:
    plan = plan_workers(cpus=256, quota=None, limit=1024 * GiB, baseline=30 * MiB)
    assert (plan.count, plan.binding) == (MAX_WORKERS, "maximum")


def test_the_description_names_the_inputs() -> None:
    plan = plan_workers(cpus=2, quota=None, limit=2 * GiB, baseline=30 * MiB)
    assert plan.describe() == "2 (2 usable CPUs; memory cap 17)"
    capped = plan_workers(cpus=8, quota=1.5, limit=64 * MiB, baseline=30 * MiB)
    assert capped.describe() == "1 (2 usable CPUs; memory cap 1)"
    assert "cgroup quota 1.5" in capped.explain()
    assert "64.0 MiB" in capped.explain()


@pytest.mark.parametrize("bad", [0, -1])
def test_nonsense_inputs_are_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        plan_workers(cpus=bad, quota=None, limit=2 * GiB, baseline=30 * MiB)
    with pytest.raises(ValueError):
        plan_workers(cpus=2, quota=None, limit=2 * GiB, baseline=bad)
