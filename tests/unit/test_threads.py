"""Reading a CPU limit: cgroup v1/v2 quota files and Kubernetes-style quantities."""

from __future__ import annotations

from pathlib import Path

import pytest

from doredis.worker.threads import cgroup_cpu_limit, parse_cpu_quantity


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("text", "cpus"), [("1", 1), ("2", 2), ("1.5", 2), ("500m", 1), ("2500m", 3), (" 4 ", 4)]
)
def test_quantities_round_up(text, cpus):
    assert parse_cpu_quantity(text) == cpus


@pytest.mark.parametrize("text", ["two", "0", "-1", "m", "nan", "inf", ""])
def test_bad_quantities_name_the_variable_and_the_fix(text):
    with pytest.raises(ValueError, match=r"DOREDIS_CPU_LIMIT=.* is not a CPU count: give a positive number"):
        parse_cpu_quantity(text)


def test_cgroup_v2_container_view(tmp_path):
    """In a container (cgroup namespace) the mount's root is the container's own cgroup."""
    write(tmp_path / "cpu.max", "150000 100000\n")
    write(tmp_path / "proc-cgroup", "0::/\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "proc-cgroup") == 1.5


def test_cgroup_v2_host_view_and_no_quota(tmp_path):
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "system.slice" / "job.service" / "cpu.max", "200000 100000\n")
    write(tmp_path / "proc-cgroup", "0::/system.slice/job.service\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "proc-cgroup") == 2
    write(tmp_path / "proc-cgroup", "0::/\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "proc-cgroup") is None


def test_cgroup_v1(tmp_path):
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")  # the root: no quota
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "proc-cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "proc-cgroup") == 0.5


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-proc") is None
    write(tmp_path / "proc-cgroup", "garbage line\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "proc-cgroup") is None
