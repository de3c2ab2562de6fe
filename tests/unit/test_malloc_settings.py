"""doredis.allocator: when the malloc settings apply, what they add to a redis-server's environment,
and (in fresh processes) what they change: page faults for a chunk's worth of big blocks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from doredis import allocator

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
OURS = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")


def test_server_environment_adds_the_tunables_and_keeps_everything_else():
    env = allocator.server_environment({"PATH": "/bin", "HOME": "/root"})
    assert env == {"PATH": "/bin", "HOME": "/root", "GLIBC_TUNABLES": OURS}


def test_server_environment_appends_to_unrelated_tunables():
    env = allocator.server_environment({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{OURS}"


@pytest.mark.parametrize(
    "user",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"DOREDIS_MALLOC_TUNING": "0"},
        {"DOREDIS_MALLOC_TUNING": "off"},
    ],
)
def test_the_users_own_malloc_settings_or_the_switch_leave_everything_alone(user):
    assert allocator.server_environment(user) == user
    assert allocator.tune_this_process(user) is False


def churn_faults_in_a_fresh_process(*args: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    for name in ("GLIBC_TUNABLES", *allocator.USER_VARIABLES, allocator.SWITCH_VARIABLE):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, str(TESTS / "tasks_allocator.py"), *args],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return float(out.stdout.strip())


@glibc_only
def test_a_tuned_process_reuses_a_chunks_big_blocks_instead_of_faulting_them_in_again():
    untuned = churn_faults_in_a_fresh_process()
    tuned = churn_faults_in_a_fresh_process("tune")
    # 16 MiB a round is 4,096 pages: glibc's defaults map and fault in most of them every round.
    assert untuned > 1000, untuned
    assert tuned < 50, tuned
