"""The KEDA autoscaling policy of k8s/overlays/keda, simulated at process level.

A small controller plays KEDA + the HorizontalPodAutoscaler + the Deployment: every TICK it reads
from the real redis-server the SAME metrics the rendered ScaledObject declares (its triggers'
listNames, counted the way KEDA's redis scaler counts a key: by its type, LLEN for rq's queue
list, ZCARD for rq's started registry), applies the HPA formula (desired = ceil(metric /
listLength), the largest over the triggers, with the HPA's 10 % tolerance) and the declared
behavior (stabilization windows, rate policies), KEDA's activation and cooldown, and then starts
real `doredis worker` processes or removes them like a ReplicaSet: SIGTERM to the most recently
ready worker, SIGKILL once the pod's grace period is over.

Every number comes from the rendered YAML (listLength, min/max replicas, behavior, cooldown,
terminationGracePeriodSeconds, DOREDIS_DRAIN_TIMEOUT). Time is scaled down: every period is
divided by FACTOR, so that the test takes well under a minute. The one gap that is not scaled
is the one between the drain timeout and the grace period: that is the time the hand-back itself
takes (the worker checks its drain deadline once a second), which does not shrink with the time
scale; it is kept at MIN_HANDBACK seconds at least.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

import doredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
import deploykit  # noqa: E402

FACTOR = 60  # Kubernetes seconds per simulated second
TICK = 0.5  # the controller's loop (KEDA's polling and the HPA's sync period, scaled)
MIN_HANDBACK = 3.0  # seconds between the drain deadline and the SIGKILL, at least
HPA_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance default


# ------------------------------------------------------------------------- the declared policy
@dataclass
class Rules:
    """autoscaling/v2 HPAScalingRules, in simulated seconds."""

    window: float
    select: str
    policies: list[tuple[str, int, float]]  # (Pods | Percent, value, period)


@dataclass
class Policy:
    triggers: list[tuple[str, int, int]]  # (listName, listLength, activationListLength)
    min_replicas: int
    max_replicas: int
    cooldown: float
    up: Rules
    down: Rules
    grace: float  # the worker pods' terminationGracePeriodSeconds, simulated
    drain: float  # their DOREDIS_DRAIN_TIMEOUT, simulated
    queue: str  # the queue the listNames are of (the ConfigMap's DOREDIS_QUEUE)

    def for_queue(self, queue: str) -> Policy:
        """The same policy watching another queue's keys (listName = <prefix>:<queue>)."""
        triggers = []
        for name, target, activation in self.triggers:
            assert name.endswith(":" + self.queue), name
            triggers.append((name[: -len(self.queue)] + queue, target, activation))
        return Policy(**{**self.__dict__, "triggers": triggers, "queue": queue})


def _rules(raw: dict, defaults: dict) -> Rules:
    raw = {**defaults, **raw}
    return Rules(
        window=raw["stabilizationWindowSeconds"] / FACTOR,
        select=raw.get("selectPolicy", "Max"),
        policies=[(p["type"], int(p["value"]), p["periodSeconds"] / FACTOR) for p in raw["policies"]],
    )


def load_policy(workdir: Path) -> Policy:
    """Render k8s/overlays/keda (in a copy whose secret.env generate-secret.sh wrote) and read it."""
    k8s = deploykit.k8s_copy_with_secret(workdir / "k8s")
    objs = deploykit.render(k8s / "overlays" / "keda")
    spec = deploykit.one(objs, "ScaledObject", "worker")["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    worker = deploykit.one(objs, "Deployment", spec["scaleTargetRef"]["name"])
    pod = deploykit.pod_spec(worker)
    assert pod is not None
    [container] = [c for c in pod["containers"] if c["name"] == "worker"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    drain = float(deploykit.env_setting(container, objs, "DOREDIS_DRAIN_TIMEOUT"))
    queue = deploykit.one(objs, "ConfigMap", "doredis")["data"]["DOREDIS_QUEUE"]
    triggers = []
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis" and trigger.get("metricType", "AverageValue") == "AverageValue"
        meta = trigger["metadata"]
        triggers.append((meta["listName"], int(meta["listLength"]), int(meta.get("activationListLength", 0))))
    # The HPA's defaults where the ScaledObject leaves a field out.
    up_defaults = {
        "stabilizationWindowSeconds": 0,
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15},
            {"type": "Pods", "value": 4, "periodSeconds": 15},
        ],
    }
    down_defaults = {
        "stabilizationWindowSeconds": 300,
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
    }
    return Policy(
        triggers=triggers,
        min_replicas=spec.get("minReplicaCount", 0),
        max_replicas=spec.get("maxReplicaCount", 100),
        cooldown=spec.get("cooldownPeriod", 300) / FACTOR,
        up=_rules(behavior.get("scaleUp", {}), up_defaults),
        down=_rules(behavior.get("scaleDown", {}), down_defaults),
        grace=drain / FACTOR + max((grace - drain) / FACTOR, MIN_HANDBACK),
        drain=drain / FACTOR,
        queue=queue,
    )


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return load_policy(tmp_path_factory.mktemp("keda-policy"))


# ------------------------------------------------------------------------ KEDA + the HPA
def keda_count(conn: redis.Redis, key: str) -> int:
    """A key's length as KEDA's redis scaler reads it: by the key's type."""
    kind = conn.type(key).decode()
    if kind == "none":
        return 0
    counters = {"list": conn.llen, "zset": conn.zcard, "set": conn.scard, "hash": conn.hlen}
    return counters[kind](key)


@dataclass
class Autoscaler:
    """KEDA's ScaledObject (activation 0 -> 1, scale to zero after the cooldown) over the HPA
    (replica formula, stabilization windows, rate policies), on simulated time."""

    policy: Policy
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, +added / -removed)
    last_active: float = -math.inf

    def hpa_proposal(self, metrics: dict[str, int], current: int) -> int:
        proposals = []
        for name, target, _ in self.policy.triggers:
            usage = metrics[name]
            ratio = usage / (target * current)
            proposals.append(current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(usage / target))
        return max(proposals)

    def _changed_in(self, period: float, now: float) -> tuple[int, int]:
        recent = [d for t, d in self.events if t > now - period]
        return sum(d for d in recent if d > 0), -sum(d for d in recent if d < 0)

    def _limit(self, rules: Rules, current: int, now: float, up: bool) -> int:
        if rules.select == "Disabled":
            return current
        proposals = []
        for kind, value, period in rules.policies:
            added, removed = self._changed_in(period, now)
            start = current - added + removed
            if up:
                proposals.append(start + value if kind == "Pods" else math.ceil(start * (1 + value / 100)))
            else:
                proposals.append(start - value if kind == "Pods" else int(start * (1 - value / 100)))
        # "Max" picks the policy allowing the biggest change, "Min" the smallest.
        biggest_change = max if up else min
        smallest_change = min if up else max
        return (biggest_change if rules.select == "Max" else smallest_change)(proposals)

    def hpa(self, metrics: dict[str, int], current: int, now: float) -> int:
        desired = self.hpa_proposal(metrics, current)
        up_cut, down_cut = now - self.policy.up.window, now - self.policy.down.window
        up_rec = min([desired] + [r for t, r in self.recommendations if t > up_cut])
        down_rec = max([desired] + [r for t, r in self.recommendations if t > down_cut])
        self.recommendations.append((now, desired))
        stabilized = min(max(current, up_rec), down_rec)
        low, high = max(1, self.policy.min_replicas), self.policy.max_replicas
        if stabilized > current:
            stabilized = min(stabilized, high, max(current, self._limit(self.policy.up, current, now, True)))
        elif stabilized < current:
            stabilized = max(
                stabilized, low, min(current, self._limit(self.policy.down, current, now, False))
            )
        if stabilized != current:
            self.events.append((now, stabilized - current))
        return stabilized

    def step(self, metrics: dict[str, int], current: int, now: float) -> int:
        active = any(metrics[name] > activation for name, _, activation in self.policy.triggers)
        if active:
            self.last_active = now
        if current == 0:
            return max(1, self.policy.min_replicas) if active else 0
        if not active and self.policy.min_replicas == 0 and now - self.last_active >= self.policy.cooldown:
            return 0
        return self.hpa(metrics, current, now)


def test_the_queue_list_alone_scales_busy_workers_away(policy: Policy) -> None:
    """What the issue saw, from the policy alone (no processes): with only the queue list as
    metric, KEDA scales to zero while the last chunk runs; with the running chunks counted too,
    it never goes below one worker per running chunk, however long the chunk."""
    queue_list, running = (name for name, _, _ in policy.triggers)
    tail = {queue_list: 0, running: 1}  # nothing queued, one long chunk running
    list_only = Policy(**{**policy.__dict__, "triggers": [policy.triggers[0]]})
    for candidate, floor in ((list_only, 0), (policy, 1)):
        scaler, replicas, now = Autoscaler(candidate), 3, 0.0
        scaler.last_active = now
        seen = []
        while now < 10 * (policy.cooldown + policy.down.window):
            replicas = scaler.step(tail, replicas, now)
            seen.append(replicas)
            now += TICK
        assert seen[-1] == floor, (candidate.triggers, seen)
        assert min(seen) == floor
    # Scale-down is gradual: 3 chunks running, then 1: pods go only after the stabilization
    # window, one at a time, no faster than the declared policy allows.
    scaler, replicas, now, drops = Autoscaler(policy), 3, 0.0, []
    while now < 5:
        replicas = scaler.step({queue_list: 0, running: 3}, replicas, now)
        now += TICK
    assert replicas == 3
    last_busy = now - TICK  # the last recommendation of 3
    for _ in range(200):
        new = scaler.step({queue_list: 0, running: 1}, replicas, now)
        if new < replicas:
            drops.append((now, replicas - new))
        replicas, now = new, now + TICK
    assert replicas == 1 and [n for _, n in drops] == [1, 1], drops
    assert drops[0][0] - last_busy >= policy.down.window, "pods went before the stabilization window"
    slowest = max(period for kind, _, period in policy.down.policies)
    assert drops[1][0] - drops[0][0] >= slowest - 1e-9, drops


# ------------------------------------------------------------ the Deployment, with real workers
@dataclass
class Pod:
    process: subprocess.Popen
    started: float
    terminated: float | None = None  # when it got SIGTERM
    killed: bool = False  # SIGKILLed after the grace period
    busy_at_sigterm: list[int] = field(default_factory=list)  # tasks in hand at SIGTERM
    busy_at_sigkill: list[int] = field(default_factory=list)  # tasks in hand at SIGKILL
    exit_code: int | None = None


class Deployment:
    """A ReplicaSet's view of the worker pods: replica count in, processes out."""

    def __init__(self, workers, conn: redis.Redis, queue: str, policy: Policy, ledger: Ledger) -> None:
        self.workers, self.conn, self.queue, self.policy, self.ledger = workers, conn, queue, policy, ledger
        self.pods: list[Pod] = []

    def live(self) -> list[Pod]:
        return [p for p in self.pods if p.terminated is None and p.exit_code is None]

    def ready_since(self) -> dict[int, float]:
        """Registered (ready) workers by pid: when rq registered them."""
        out = {}
        for worker in Worker.all(queue=Queue(self.queue, connection=self.conn)):
            pid = int(worker.name.rsplit(":", 1)[1])
            out[pid] = worker.birth_date.timestamp() if worker.birth_date else 0.0
        return out

    def scale(self, replicas: int, now: float) -> None:
        live = self.live()
        if len(live) < replicas:
            for _ in range(replicas - len(live)):
                [process] = self.workers.start(
                    1, env={"DOREDIS_DRAIN_TIMEOUT": f"{self.policy.drain:g}"}, wait=False
                )
                self.pods.append(Pod(process, now))
        elif len(live) > replicas:
            ready = self.ready_since()

            # A ReplicaSet deletes pods that are not ready first, then the most recently ready.
            def rank(pod: Pod) -> tuple[int, float, float]:
                since = ready.get(pod.process.pid)
                return (0 if since is None else 1, -(since or 0.0), -pod.started)

            for pod in sorted(live, key=rank)[: len(live) - replicas]:
                pod.busy_at_sigterm = self.ledger.in_hand(pod.process.pid)
                pod.process.send_signal(signal.SIGTERM)
                pod.terminated = now

    def reap(self, now: float) -> None:
        for pod in self.pods:
            if pod.exit_code is None and (code := pod.process.poll()) is not None:
                pod.exit_code = code
            if (
                pod.terminated is not None
                and pod.exit_code is None
                and now - pod.terminated > self.policy.grace
            ):
                pod.busy_at_sigkill = self.ledger.in_hand(pod.process.pid)
                pod.process.kill()  # the grace period is over
                pod.killed = True
                pod.exit_code = pod.process.wait(10)


class Ledger:
    """What the tasks record in Redis: which worker (pid) started and finished which task."""

    def __init__(self, conn: redis.Redis, prefix: str) -> None:
        self.conn, self.prefix = conn, prefix

    def _entries(self, what: str) -> list[tuple[int, int]]:
        return [tuple(map(int, e.split(b":"))) for e in self.conn.lrange(f"{self.prefix}:{what}", 0, -1)]

    def started(self) -> list[tuple[int, int]]:
        return self._entries("started")

    def finished(self) -> list[tuple[int, int]]:
        return self._entries("finished")

    def in_hand(self, pid: int) -> list[int]:
        done = {(i, p) for i, p in self.finished()}
        return [i for i, p in self.started() if p == pid and (i, p) not in done]


def make_task(redis_url: str, prefix: str, medium: int, long: int, long_seconds: float):
    """The run's task (a closure, so it travels by value to the workers):

    * ``medium`` (the first chunk) holds its worker until the long task has started elsewhere;
    * ``long`` (the last chunk) works ``long_seconds`` the first time; a second delivery (after a
      hand-back) resumes from its checkpoint and is quick;
    * the others are short.
    Each records its start and finish (index:pid) in Redis."""

    def task(i):
        import os
        import time

        import redis

        r = redis.Redis.from_url(redis_url)
        pid = os.getpid()
        r.rpush(f"{prefix}:started", f"{i}:{pid}")
        if i == medium:
            deadline = time.monotonic() + 60
            while not any(e.startswith(f"{long}:".encode()) for e in r.lrange(f"{prefix}:started", 0, -1)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the long task never started")
                time.sleep(0.05)
        elif i == long and r.incr(f"{prefix}:long-deliveries") == 1:
            time.sleep(long_seconds)
        else:
            time.sleep(0.05)
        r.rpush(f"{prefix}:finished", f"{i}:{pid}")
        return i * i

    return task


@pytest.mark.timeout(180)
def test_keda_policy_never_stops_a_busy_worker_before_its_chunk_is_done_or_handed_back(
    policy: Policy, redis_url: str, conn: redis.Redis, queue: str, workers
) -> None:
    """A run whose last chunk is long, under the declared policy: workers are added for the
    queue, the surplus is removed while the long chunk runs (the Deployment may pick its busy
    worker), and no worker is ever SIGKILLed: a busy one hands its chunk back within the drain
    timeout and exits 0; the run completes with every result exactly once."""
    policy = policy.for_queue(queue)
    queued_target = policy.triggers[0][1]
    # medium + queued_target short chunks + long: enough queued at the start for 2 workers.
    n = queued_target + 2
    medium, long = 0, n - 1
    # Long enough that, without a hand-back, the worker would still be busy when the grace
    # period ends (the window before the scale-down plus the grace period, with room to spare).
    long_seconds = policy.down.window + policy.grace + 8
    prefix = f"autoscale:{queue}"
    ledger = Ledger(conn, prefix)
    scaler = Autoscaler(policy)
    deployment = Deployment(workers, conn, queue, policy, ledger)

    task = make_task(redis_url, prefix, medium, long, long_seconds)
    run = doredis.submit(range(n), task, chunk_size=1, redis=redis_url, queue=queue)
    gathered: list = []
    driver = threading.Thread(target=lambda: gathered.append(run.results()), daemon=True)
    driver.start()
    replicas, history = 0, []
    t0 = time.monotonic()
    deadline = t0 + 120
    try:
        # Until the run is done and KEDA has scaled the idle workers away (cooldown).
        while driver.is_alive() or replicas or [p for p in deployment.pods if p.exit_code is None]:
            now = time.monotonic() - t0
            assert time.monotonic() < deadline, (
                f"no end in sight: {history[-5:]}\n{workers.all_logs()[-3000:]}"
            )
            metrics = {name: keda_count(conn, name) for name, _, _ in policy.triggers}
            replicas = scaler.step(metrics, replicas, now)
            history.append((round(now, 1), metrics, replicas))
            deployment.scale(replicas, now)
            deployment.reap(now)
            # The controller's period: the loop is the clock here, not a wait for a condition.
            time.sleep(TICK)
    finally:
        if driver.is_alive():
            run.cancel()
    assert gathered == [[i * i for i in range(n)]], workers.all_logs()[-3000:]

    logs = workers.all_logs()
    finished = [i for i, _ in ledger.finished()]
    assert sorted(finished) == list(range(n)), f"every task finishes exactly once: {finished}"
    busy_killed = [
        (p.process.pid, p.busy_at_sigkill) for p in deployment.pods if p.killed and p.busy_at_sigkill
    ]
    assert not busy_killed, f"busy workers SIGKILLed mid-chunk (pid, tasks): {busy_killed}\n{logs[-3000:]}"
    stopped = [p for p in deployment.pods if p.terminated is not None]
    assert stopped
    # Every SIGTERMed worker exits 0 by itself: an idle one at once, a busy one once its chunk
    # is done or handed back. (An idle worker SIGKILLed after ignoring SIGTERM fails here.)
    codes = [(p.process.pid, p.exit_code, "SIGKILLed" if p.killed else "") for p in stopped]
    assert all(p.exit_code == 0 and not p.killed for p in stopped), f"{codes}\n{logs[-3000:]}"
    # The scenario the policy must survive did happen: the Deployment picked the worker holding
    # the long chunk; it handed the chunk back (exit 0, before the grace period ended) and
    # another worker finished it.
    drained = [p for p in stopped if long in p.busy_at_sigterm]
    assert drained, f"no busy worker was scaled away: {[(p.process.pid, p.busy_at_sigterm) for p in stopped]}"
    [(_, finisher)] = [(i, pid) for i, pid in ledger.finished() if i == long]
    assert finisher != drained[0].process.pid
    assert int(conn.get(f"{prefix}:long-deliveries")) == 2
    # KEDA never dropped below one worker per running chunk, and reached zero only at the end.
    running_key = policy.triggers[1][0]
    for _, metrics, count in history:
        assert count >= min(metrics[running_key], policy.max_replicas), history
