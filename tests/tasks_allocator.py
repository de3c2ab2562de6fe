"""Tasks of the allocator tests: what a chunk's big blocks cost the process that runs it."""

from __future__ import annotations

import resource

MiB = 1 << 20


def churn_faults(_item: object, rounds: int = 20) -> float:
    """Minor page faults per round of what a chunk of 1 MiB results does to memory: eight 1 MiB
    values and their ~8 MiB envelope allocated, then all freed. The first rounds are not counted
    (they fault the memory in once)."""

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    start = 0
    for i in range(rounds + 2):
        if i == 2:
            start = faults()
        values = [bytes([i]) * MiB for _ in range(8)]
        envelope = b"".join(values)
        del values, envelope
    return (faults() - start) / rounds


if __name__ == "__main__":  # a fresh process: python tasks_allocator.py [tune]
    import sys

    if sys.argv[1:] == ["tune"]:
        from doredis import allocator

        assert allocator.tune_this_process(), "tune_this_process() did not apply"
    print(churn_faults(None))
