#!/usr/bin/env bash
# End-to-end test of the container deployment: the repo's Dockerfile and
# docker-compose.yml, run with podman + podman-compose (there is no Docker
# engine here), with base images built locally (no registry can be pulled from).
#
#   sudo bash tests/e2e/compose.sh          # as root; prints PASS/FAIL, exits non-zero on failure
#
# 1. installs podman, runc, debootstrap, netavark/aardvark-dns (apt) and
#    podman-compose (PyPI, in a venv of its own);
# 2. configures podman through files in a per-run work dir (CONTAINERS_CONF,
#    CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF): runc, cgroupfs,
#    file events, no default ulimits, image storage under $E2E_CACHE;
# 3. builds stand-ins of python:3.11-slim and redis:7(-alpine) from a debootstrap
#    rootfs (cached in podman storage under $E2E_CACHE, keyed on a hash of the recipe);
# 4. builds the project image from the Dockerfile via `podman-compose build`;
# 5. starts redis and 3 workers, runs the driver (tests/e2e/driver_e2e.py, as the
#    compose `driver` service) over E2E_TASKS tasks, and while it runs scales the
#    workers up to 5 and down to 2 (SIGTERM); asserts every result came back once,
#    in order, from more than one worker. The driver's tasks call a helper module next to
#    the script (e2e_shipped.py) that the image does not contain: doredis ships it;
# 6. (notebook_step) builds the notebook image (the Dockerfile with EXTRAS=notebook: JupyterLab from
#    PyPI), starts the compose `notebook` service, checks its token on its loopback port, and runs
#    examples/quickstart.ipynb in it (tests/e2e/notebook_e2e.py, nbclient + a real kernel) against
#    the project's Redis and workers; asserts the outputs, and that the tasks ran on the workers.
#
# Takes about 2 min on a fresh machine, 25 s with the base images cached (same machine).
#
# Knobs (environment): E2E_TIMEOUT (overall bound, s, default 900), E2E_TASKS (800),
# E2E_TASK_SECONDS (0.05), E2E_CHUNK_SIZE (adaptive), E2E_CACHE (/var/cache/doredis-e2e),
# E2E_VENV (/tmp/doredis-e2e-venv), E2E_KEEP_WORKDIR=1 (keep logs; kept anyway on failure),
# E2E_LOG_LEVEL (the workers', INFO), E2E_BUILD_ARGS (extra `podman build` arguments for the
# project image), E2E_PIN_REDIS_HOST=0 (see below), E2E_DRIVER_TIMEOUT (300), E2E_SKIP_INSTALL=1.
set -euo pipefail

E2E_TIMEOUT=${E2E_TIMEOUT:-900}
if [[ -z "${_DOREDIS_E2E_TIMED:-}" ]]; then
    export _DOREDIS_E2E_TIMED=1
    # One run at a time per machine (they share the image cache). The lock is held here, by a
    # process that starts no container, so that no daemon podman leaves behind inherits it.
    mkdir -p "${E2E_CACHE:-/var/cache/doredis-e2e}"
    exec 9>"${E2E_CACHE:-/var/cache/doredis-e2e}/lock"
    flock -w 900 9 || { echo "e2e: FAIL: another e2e run holds the lock"; exit 1; }
    rc=0
    timeout -k 90 "$E2E_TIMEOUT" bash "$0" "$@" 9>&- || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "e2e: FAIL: overall time bound of ${E2E_TIMEOUT}s exceeded (exit $rc)"
    fi
    exit "$rc"
fi

T0=$(date +%s)
log() { printf 'e2e [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() {
    log "FAIL: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (podman rootful, apt-get, debootstrap)"

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
COMPOSE_FILE=$REPO/docker-compose.yml
DOCKERFILE=$REPO/Dockerfile
E2E_CACHE=${E2E_CACHE:-/var/cache/doredis-e2e}
E2E_VENV=${E2E_VENV:-/tmp/doredis-e2e-venv}
E2E_TASKS=${E2E_TASKS:-800}
E2E_TASK_SECONDS=${E2E_TASK_SECONDS:-0.05}
E2E_CHUNK_SIZE=${E2E_CHUNK_SIZE:-}
PODMAN_COMPOSE_VERSION=1.6.0
SUITE=bookworm
# Bump to force a rebuild of the cached base images.
RECIPE_VERSION=2

for f in "$COMPOSE_FILE" "$DOCKERFILE" "$REPO/pyproject.toml" "$REPO/doredis/__init__.py"; do
    [[ -e $f ]] || die "missing $f"
done

WORK=$(mktemp -d /tmp/doredis-e2e.XXXXXX)
PROJ=doredise2e$$
BG_PIDS=()
RESULT=FAIL

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    if [[ -n "${CONTAINERS_CONF:-}" ]] && command -v podman >/dev/null; then
        if [[ $RESULT != PASS ]]; then
            for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJ" --format '{{.Names}}' 2>/dev/null); do
                echo "----- logs of $c (last 30 lines) -----"
                podman logs --tail 30 "$c" 2>&1
            done
            [[ -s $WORK/driver.log ]] && { echo "----- driver output -----"; tail -50 "$WORK/driver.log"; }
        fi
        local ids
        ids=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJ" 2>/dev/null)
        [[ -n $ids ]] && timeout 60 podman rm -f -t 5 $ids >/dev/null 2>&1
        timeout 30 podman network rm -f "${PROJ}_default" >/dev/null 2>&1
        timeout 30 podman volume rm -f "${PROJ}_redis-data" >/dev/null 2>&1
        timeout 30 podman volume prune -f >/dev/null 2>&1
    fi
    for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [[ ${E2E_KEEP_WORKDIR:-0} == 1 || $RESULT != PASS ]]; then
        echo "e2e: work dir kept (logs, configs): $WORK"
    else
        rm -rf "$WORK"
    fi
    if [[ $RESULT == PASS && $rc -eq 0 ]]; then
        echo "e2e: PASS ($(($(date +%s) - T0))s)"
    else
        echo "e2e: FAIL (exit $rc, $(($(date +%s) - T0))s)"
        [[ $rc -eq 0 ]] && rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (overall time bound?)"; exit 143' TERM

# Runs "$@" in the background and waits, so that a TERM from the time bound is handled at once.
bgwait() {
    "$@" &
    local pid=$!
    BG_PIDS+=("$pid")
    wait "$pid"
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND (0.5 s apart) until it succeeds.
wait_for() {
    local what=$1 secs=$2
    shift 2
    local deadline=$(($(date +%s) + secs))
    until "$@"; do
        if (($(date +%s) >= deadline)); then
            die "timed out after ${secs}s waiting for: $what"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
# 1. Install
# ---------------------------------------------------------------------------------------------
APT_PKGS=(podman runc debootstrap netavark aardvark-dns containernetworking-plugins
    slirp4netns fuse-overlayfs uidmap iptables ca-certificates)
if [[ ${E2E_SKIP_INSTALL:-0} != 1 ]]; then
    missing=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        bgwait apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; die "apt-get update"; }
        DEBIAN_FRONTEND=noninteractive bgwait apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >>"$WORK/apt.log" 2>&1 || { tail -30 "$WORK/apt.log"; die "apt-get install"; }
    fi
    if ! "$E2E_VENV/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version $PODMAN_COMPOSE_VERSION"; then
        log "pip install podman-compose==$PODMAN_COMPOSE_VERSION into $E2E_VENV"
        rm -rf "$E2E_VENV"
        python3 -m venv "$E2E_VENV"
        bgwait "$E2E_VENV/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" >"$WORK/pip.log" 2>&1 \
            || { cat "$WORK/pip.log"; die "pip install podman-compose"; }
    fi
fi
command -v podman >/dev/null || die "podman is not installed"
PY=$E2E_VENV/bin/python
HELPER=("$PY" "$E2E_DIR/e2e_helper.py")

# ---------------------------------------------------------------------------------------------
# 2. Configure podman (all through files of this run; nothing in /etc is changed)
# ---------------------------------------------------------------------------------------------
# Images and build cache persist in $E2E_CACHE/storage; what podman keeps at run time (run root,
# tmp dir, volumes, networks) lives under /run. /run is not a tmpfs on every machine, so a reboot
# is detected here (boot id) and that state is dropped together with libpod's database, which
# only records containers, pods and volumes (images live in the storage, which stays).
# (Paths stay short and fixed: podman refuses a --runroot longer than 50 characters, and conmon
# runs `podman container cleanup` with --root/--runroot/--tmpdir as flags but no static dir, so
# libpod's database must stay at its default <graphroot>/libpod; otherwise every `podman run`
# waits 20 s for an exit code that is never recorded.)
STATE=/run/doredis-e2e
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)
mkdir -p "$E2E_CACHE/storage"
if [[ $(cat "$E2E_CACHE/boot-id" 2>/dev/null) != "$BOOT_ID" ]]; then
    rm -rf "$STATE" "$E2E_CACHE/storage/libpod"
    echo "$BOOT_ID" >"$E2E_CACHE/boot-id"
fi
mkdir -p "$STATE"
cat >"$WORK/containers.conf" <<EOF
[containers]
# crun/runc cannot raise RLIMIT_NOFILE/NPROC in this sandbox ("setrlimit ... Operation not permitted").
default_ulimits = []
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$STATE/libpod-tmp"
volume_path = "$STATE/volumes"

[network]
network_backend = "netavark"
network_config_dir = "$STATE/networks"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$E2E_CACHE/storage"
runroot = "$STATE/storage"
EOF
cat >"$WORK/registries.conf" <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
# Docker's image format, as `docker build` makes: OCI images drop HEALTHCHECK (and SHELL).
export BUILDAH_FORMAT=docker

podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}} {{.Host.NetworkBackend}} cgroups {{.Host.CgroupsVersion}}' \
    >"$WORK/podman-info.txt" 2>&1 || { cat "$WORK/podman-info.txt"; die "podman info"; }
log "podman $(podman version --format '{{.Client.Version}}'): $(cat "$WORK/podman-info.txt")"

# Leftovers of an earlier run that was killed before its cleanup.
stale=$(podman ps -a -q 2>/dev/null || true)
[[ -n $stale ]] && podman rm -f -t 0 $stale >/dev/null 2>&1 || true
podman network prune -f >/dev/null 2>&1 || true
podman volume prune -f >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
# 3. Base images: debootstrap rootfs -> python:3.11-slim and redis stand-ins
# ---------------------------------------------------------------------------------------------
PC=("$E2E_VENV/bin/podman-compose" -p "$PROJ" -f "$COMPOSE_FILE")

# Settings of the compose project (exported before any podman-compose call: it interpolates them).
export REDIS_PASSWORD=e2e$RANDOM$RANDOM
export DOREDIS_SECRET=e2e-secret-$RANDOM$RANDOM
export DOREDIS_QUEUE=doredis
export REDIS_HOST_PORT
REDIS_HOST_PORT=$("${HELPER[@]}" free-port)
export DOREDIS_SCRIPTS_DIR=$WORK/scripts
export DOREDIS_DRIVER_SCRIPT=driver_e2e.py
export EXTRA_PIP_PACKAGES='' DOREDIS_PRELOAD='' DOREDIS_LOG_LEVEL=${E2E_LOG_LEVEL:-INFO} REDIS_APPENDONLY=yes
# The compose file's defaults (maxmemory, the workers' drain timeout), not the caller's.
unset DOREDIS_IMAGE REDIS_IMAGE PYTHON_VERSION REDIS_MAXMEMORY DOREDIS_DRAIN_TIMEOUT 2>/dev/null || true

"${PC[@]}" config >"$WORK/compose-config.yml" 2>"$WORK/compose-config.err" \
    || { cat "$WORK/compose-config.err"; die "podman-compose config"; }
info=$("${HELPER[@]}" compose-info "$DOCKERFILE" <"$WORK/compose-config.yml") || die "reading the compose file"
eval "$info"
log "images: redis=$REDIS_IMAGE_REF python base=$PYTHON_BASE_REF; worker stop grace ${WORKER_GRACE}s, drain ${WORKER_DRAIN}s"
# A stopped worker must hand back its chunk before podman's SIGKILL.
awk -v d="$WORKER_DRAIN" -v g="$WORKER_GRACE" 'BEGIN { exit !(d > 0 && d < g) }' \
    || die "DOREDIS_DRAIN_TIMEOUT (${WORKER_DRAIN}s) must be below stop_grace_period (${WORKER_GRACE}s)"

MIRROR=$("${HELPER[@]}" apt-mirror)
mkdir -p "$WORK/base/extra-ca"
n_ca=$("${HELPER[@]}" extra-ca /etc/ssl/certs/ca-certificates.crt "$WORK/base/extra-ca")
echo "placeholder: only *.crt files are used" >"$WORK/base/extra-ca/README"
cp "$E2E_DIR"/base-images/* "$WORK/base/"
log "apt mirror $MIRROR; $n_ca extra CA certificate(s) from the host for the python stand-in"

DEB_KEY=$(printf '%s\n' "$RECIPE_VERSION" "$MIRROR" "$SUITE" minbase | sha256sum | cut -c1-16)
DEB_IMG=localhost/doredis-e2e/debian:$DEB_KEY
PY_KEY=$( (echo "$DEB_KEY"; cat "$WORK/base/python.Containerfile" "$WORK/base/extra-ca/"*) | sha256sum | cut -c1-16)
PY_IMG=localhost/doredis-e2e/python:$PY_KEY
REDIS_KEY=$( (echo "$DEB_KEY"; cat "$WORK/base/redis.Containerfile" "$WORK/base/redis-entrypoint.sh") | sha256sum | cut -c1-16)
REDIS_IMG=localhost/doredis-e2e/redis:$REDIS_KEY

if ! podman image exists "$DEB_IMG"; then
    log "debootstrap --variant=minbase $SUITE from $MIRROR (cache key $DEB_KEY)"
    rootfs=$WORK/rootfs
    bgwait debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -30 "$WORK/debootstrap.log"; die "debootstrap"; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    tar -C "$rootfs" -c . | podman import -q --change 'CMD ["bash"]' - "$DEB_IMG" >/dev/null \
        || die "podman import"
    rm -rf "$rootfs"
fi
build_base() { # IMAGE CONTAINERFILE
    if ! podman image exists "$1"; then
        log "building base image $1"
        bgwait podman build -q --pull=never --build-arg "DEBIAN_BASE=$DEB_IMG" -f "$WORK/base/$2" -t "$1" \
            "$WORK/base" >"$WORK/build-$2.log" 2>&1 || { tail -30 "$WORK/build-$2.log"; die "building $1"; }
    fi
}
build_base "$PY_IMG" python.Containerfile
build_base "$REDIS_IMG" redis.Containerfile
# Drop base images of older recipes.
for img in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/doredis-e2e/' || true); do
    case $img in "$DEB_IMG" | "$PY_IMG" | "$REDIS_IMG") ;; *) podman rmi -f "$img" >/dev/null 2>&1 || true ;; esac
done
podman tag "$PY_IMG" "$PYTHON_BASE_REF"
podman tag "$REDIS_IMG" "$REDIS_IMAGE_REF" docker.io/library/redis:7 docker.io/library/redis:7-alpine
log "base images ready: $PYTHON_BASE_REF <- $PY_IMG, $REDIS_IMAGE_REF <- $REDIS_IMG"

# ---------------------------------------------------------------------------------------------
# 4. Project image, from the repo's Dockerfile through the compose file's build section
# ---------------------------------------------------------------------------------------------
log "podman-compose build worker"
bgwait "${PC[@]}" "--podman-build-args=--pull=never ${E2E_BUILD_ARGS:-}" build worker >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; die "building the project image"; }
podman image prune -f >/dev/null 2>&1 || true
log "project image built"

# Math-library thread caps in a real container: under --cpus=1 (a cgroup CPU quota) the worker's
# start-up code caps OMP_NUM_THREADS & co at 1; a value the user sets is kept (worker/threads.py).
if (($(nproc) >= 2)); then
    cap_probe='import os; from doredis.worker.threads import cap_math_threads as c; c(); print(os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS"))'
    got=$(podman run --rm --no-healthcheck --cpus=1 --entrypoint python localhost/doredis:latest -c "$cap_probe" 2>&1) \
        || die "thread-cap probe: $got"
    [[ $got == "1 1" ]] || die "under --cpus=1 expected OMP/OPENBLAS_NUM_THREADS 1 1, got: $got"
    got=$(podman run --rm --no-healthcheck --cpus=1 -e OMP_NUM_THREADS=3 --entrypoint python localhost/doredis:latest \
        -c "$cap_probe" 2>&1) || die "thread-cap probe: $got"
    [[ $got == "3 None" ]] || die "a user-set OMP_NUM_THREADS=3 must win (and nothing else be set), got: $got"
    log "thread caps: --cpus=1 -> OMP_NUM_THREADS=1; a user-set OMP_NUM_THREADS=3 is kept"
fi

# ---------------------------------------------------------------------------------------------
# 5. Run: redis, 3 workers, the driver; scale to 5 and down to 2 while it runs
# ---------------------------------------------------------------------------------------------
mkdir -p "$DOREDIS_SCRIPTS_DIR"
# e2e_shipped.py: a helper module the driver imports and the image lacks; the run ships it.
cp "$E2E_DIR/driver_e2e.py" "$E2E_DIR/e2e_shipped.py" "$DOREDIS_SCRIPTS_DIR/"
chmod 755 "$DOREDIS_SCRIPTS_DIR"
chmod 644 "$DOREDIS_SCRIPTS_DIR/driver_e2e.py" "$DOREDIS_SCRIPTS_DIR/e2e_shipped.py"

REDIS_C=${PROJ}_redis_1
rcli() { podman exec "$REDIS_C" redis-cli --no-auth-warning -a "$REDIS_PASSWORD" "$@"; }
workers() { podman ps --filter "label=io.podman.compose.project=$PROJ" --filter "label=io.podman.compose.service=worker" \
    --format '{{.Names}}' | sort -t_ -k3 -n; }
n_workers() { workers | wc -l; }
have_workers() { (($(n_workers) == $1)); }
executed() { rcli HLEN e2e:exec 2>/dev/null || echo 0; }

log "up: redis"
bgwait "${PC[@]}" up -d --no-build --no-recreate redis >"$WORK/up-redis.log" 2>&1 \
    || { cat "$WORK/up-redis.log"; die "podman-compose up redis"; }
# podman < 4.6 cannot wait for `condition: service_healthy` and has no systemd here to run
# healthchecks on a timer, so run the compose file's healthcheck by hand until it passes.
wait_for "redis healthcheck (compose file's)" 60 podman healthcheck run "$REDIS_C"
log "redis healthy ($(rcli INFO server | grep -o 'redis_version:[0-9.]*'))"

# aardvark-dns 1.4 (Debian bookworm) tears down and re-creates its sockets on every SIGHUP, which
# netavark sends whenever a container joins or leaves the network (containers/aardvark-dns#389,
# fixed in 1.11 by #449): a lookup of "redis" in flight at that moment is lost, and the resolver
# then hangs 5-20 s or fails ("Name or service not known" from the host's fallback nameserver).
# Scaling does exactly that, so by default the workers and the driver get "redis" pinned in
# /etc/hosts (the same address aardvark-dns serves; Docker's embedded DNS has no such gap).
# E2E_PIN_REDIS_HOST=0 resolves it through aardvark-dns as compose would.
PC_RUN=("${PC[@]}")
if [[ ${E2E_PIN_REDIS_HOST:-1} == 1 ]]; then
    REDIS_IP=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$REDIS_C" | awk '{print $1}')
    [[ -n $REDIS_IP ]] || die "no IP address for $REDIS_C"
    PC_RUN+=("--podman-run-args=--add-host=redis:$REDIS_IP")
    log "redis pinned to $REDIS_IP in the workers' and the driver's /etc/hosts"
fi

log "up: --scale worker=3"
bgwait "${PC_RUN[@]}" up -d --no-build --no-recreate --scale worker=3 worker >"$WORK/up-workers.log" 2>&1 \
    || { cat "$WORK/up-workers.log"; die "podman-compose up --scale worker=3"; }
wait_for "3 running workers" 60 have_workers 3
first_worker=$(workers | head -1)
# The compose file's worker healthcheck (liveness: `doredis alive`, like the image's HEALTHCHECK).
wait_for "worker healthcheck (compose file's: doredis alive)" 60 podman healthcheck run "$first_worker"
log "workers: $(workers | xargs)"
# The driver's helper module is not in the image: the workers get it only through the run.
if podman exec "$first_worker" python -c "import e2e_shipped" >/dev/null 2>&1; then
    die "the image contains e2e_shipped: the test of shipped code would prove nothing"
fi

log "run --rm driver ($E2E_TASKS tasks of ${E2E_TASK_SECONDS}s)"
export E2E_TASKS E2E_TASK_SECONDS E2E_CHUNK_SIZE
"${PC_RUN[@]}" --profile driver run --rm -T \
    -e E2E_TASKS="$E2E_TASKS" -e E2E_TASK_SECONDS="$E2E_TASK_SECONDS" -e E2E_CHUNK_SIZE="$E2E_CHUNK_SIZE" \
    driver </dev/null >"$WORK/driver.log" 2>&1 &
DRIVER_PID=$!
BG_PIDS+=("$DRIVER_PID")
driver_alive() { kill -0 "$DRIVER_PID" 2>/dev/null; }

progress_at_least() { # N: at least N tasks executed (fails fast if the driver exited)
    driver_alive || die "driver exited early: $(tail -20 "$WORK/driver.log")"
    (($(executed) >= $1))
}
wait_for "the driver's first $((E2E_TASKS / 10)) tasks" 180 progress_at_least $((E2E_TASKS / 10))
log "in progress: $(executed)/$E2E_TASKS tasks executed; scaling up to 5 workers"

before_up=$(workers)
bgwait "${PC_RUN[@]}" up -d --no-build --no-recreate --scale worker=5 worker >"$WORK/up-scale5.log" 2>&1 \
    || { cat "$WORK/up-scale5.log"; die "podman-compose up --scale worker=5"; }
wait_for "5 running workers" 60 have_workers 5
added=$(comm -13 <(echo "$before_up" | sort) <(workers | sort))
added_hosts=$(for c in $added; do podman inspect -f '{{.Config.Hostname}}' "$c"; done | xargs)
log "workers: $(workers | xargs) (added: ${added//$'\n'/ } = hosts $added_hosts)"

added_worked() {
    driver_alive || die "driver exited before an added worker ran a task: $(tail -20 "$WORK/driver.log")"
    local h
    for h in $added_hosts; do [[ $(rcli SISMEMBER e2e:hosts "$h") == 1 ]] && return 0; done
    return 1
}
wait_for "an added worker to run a task" 120 added_worked
done_before_down=$(executed)
((done_before_down < E2E_TASKS)) || die "the run was over before the scale-down; raise E2E_TASKS"
[[ $(rcli GET e2e:driver) == started ]] || die "the driver finished before the scale-down; raise E2E_TASKS"

# `docker compose up --scale worker=2` stops (SIGTERM, then SIGKILL after stop_grace_period) and
# removes the surplus containers; podman-compose 1.x does not scale down, so do exactly that.
to_stop=$(workers | tail -n +3 | xargs)
stopped_hosts=$(for c in $to_stop; do podman inspect -f '{{.Config.Hostname}}' "$c"; done | xargs)
log "in progress: $done_before_down/$E2E_TASKS tasks executed; scaling down to 2: SIGTERM to $to_stop"
stop_pids=()
for c in $to_stop; do
    (
        t=$(date +%s%3N)
        podman stop -t "$WORKER_GRACE" "$c" >/dev/null 2>>"$WORK/stop.log"
        ms=$(($(date +%s%3N) - t))
        echo "$c $(podman inspect -f '{{.State.ExitCode}}' "$c") $((ms / 1000)).$((ms % 1000 / 100))"
    ) >>"$WORK/stopped.txt" &
    stop_pids+=($!)
    BG_PIDS+=($!)
done
for pid in "${stop_pids[@]}"; do wait "$pid" || die "podman stop: $(cat "$WORK/stop.log")"; done
mkdir -p "$WORK/logs"
for c in $to_stop; do podman logs -t "$c" >"$WORK/logs/$c.log" 2>&1 || true; done
podman rm $to_stop >/dev/null
stop_codes=$(awk '{printf "%s=%s ", $1, $2}' "$WORK/stopped.txt")
log "stopped: $(awk '{printf "%s exit %s after %ss; ", $1, $2, $3}' "$WORK/stopped.txt")$(executed)/$E2E_TASKS executed; workers: $(workers | xargs)"

driver_done() { ! driver_alive; }
wait_for "the driver to finish" "${E2E_DRIVER_TIMEOUT:-300}" driver_done
drv_rc=0
wait "$DRIVER_PID" || drv_rc=$?
log "driver exited with $drv_rc; $(executed)/$E2E_TASKS executed"

for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJ" --format '{{.Names}}'); do
    podman logs -t "$c" >"$WORK/logs/$c.log" 2>&1 || true
done

failed=0
"${HELPER[@]}" check "$WORK/driver.log" "$stopped_hosts" "$added_hosts" || failed=1
((drv_rc == 0)) || { log "driver exit code $drv_rc"; failed=1; }
for kv in $stop_codes; do
    # 137: podman had to SIGKILL a worker that did not stop within stop_grace_period.
    [[ ${kv#*=} == 0 || ${kv#*=} == 143 ]] || { log "worker ${kv%=*} did not stop cleanly on SIGTERM (exit ${kv#*=})"; failed=1; }
done
(($(n_workers) == 2)) || { log "expected 2 workers still running, found: $(workers | xargs)"; failed=1; }

((failed == 0)) || die "assertions failed (see above)"

# ---------------------------------------------------------------------------------------------
# 6. The notebook driver: JupyterLab from the compose `notebook` profile runs the quickstart
#    notebook against this project's Redis and workers
# ---------------------------------------------------------------------------------------------
notebook_step() {
    export JUPYTER_TOKEN=e2e-token-$RANDOM$RANDOM$RANDOM
    export JUPYTER_PORT
    JUPYTER_PORT=$("${HELPER[@]}" free-port)
    log "podman-compose build notebook (EXTRAS=notebook: JupyterLab from PyPI)"
    bgwait "${PC[@]}" --profile notebook "--podman-build-args=--pull=never ${E2E_BUILD_ARGS:-}" build notebook \
        >"$WORK/build-notebook.log" 2>&1 || { tail -40 "$WORK/build-notebook.log"; die "building the notebook image"; }
    # The profile mounts DOREDIS_SCRIPTS_DIR read-only at ~/examples.
    cp "$REPO/examples/quickstart.ipynb" "$E2E_DIR/notebook_e2e.py" "$DOREDIS_SCRIPTS_DIR/"
    chmod 644 "$DOREDIS_SCRIPTS_DIR/quickstart.ipynb" "$DOREDIS_SCRIPTS_DIR/notebook_e2e.py"
    log "up: notebook (127.0.0.1:$JUPYTER_PORT)"
    bgwait "${PC_RUN[@]}" --profile notebook up -d --no-build --no-recreate notebook >"$WORK/up-notebook.log" 2>&1 \
        || { cat "$WORK/up-notebook.log"; die "podman-compose up notebook"; }
    local nb_c=${PROJ}_notebook_1
    nb_healthy() { podman healthcheck run "$nb_c" >/dev/null 2>&1; }
    wait_for "notebook healthcheck (compose file's: GET /api)" 180 nb_healthy
    # JUPYTER_TOKEN from the environment guards the API, on the compose file's loopback port.
    "$PY" - "$JUPYTER_PORT" "$JUPYTER_TOKEN" >"$WORK/notebook-token.log" 2>&1 <<'PYEOF' \
        || die "notebook token check: $(cat "$WORK/notebook-token.log")"
import sys
import urllib.error
import urllib.request

port, token = sys.argv[1], sys.argv[2]


def status(headers):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


codes = (status({"Authorization": f"token {token}"}), status({"Authorization": "token wrong"}), status({}))
print("GET /api/status with the token, a wrong one, none:", codes)
sys.exit(0 if codes == (200, 403, 403) else 1)
PYEOF
    log "$(cat "$WORK/notebook-token.log")"
    log "exec: quickstart.ipynb in $nb_c (nbclient, a real kernel)"
    bgwait podman exec "$nb_c" python /home/doredis/examples/notebook_e2e.py /home/doredis/examples/quickstart.ipynb \
        /home/doredis >"$WORK/notebook.log" 2>&1 || { tail -60 "$WORK/notebook.log"; die "the quickstart notebook"; }
    local summary hosts
    summary=$(grep '^E2E_NOTEBOOK ' "$WORK/notebook.log") || die "no E2E_NOTEBOOK line: $(tail -20 "$WORK/notebook.log")"
    hosts=$(for c in $(workers); do podman inspect -f '{{.Config.Hostname}}' "$c"; done | xargs)
    "$PY" -c '
import json, sys
ran = {w.rsplit(":", 1)[0] for w in json.loads(sys.argv[1][len("E2E_NOTEBOOK "):])["workers"]}
workers = set(sys.argv[2].split())
print(f"notebook tasks ran on {sorted(ran)}; compose workers {sorted(workers)}")
sys.exit(0 if ran and ran <= workers else 1)
' "$summary" "$hosts" || die "the notebook's tasks did not run on the compose workers"
    log "notebook: $summary"
}
notebook_step

RESULT=PASS
