#!/bin/sh
# Container start script of the doredis image (POSIX sh).
#
# 1. EXTRA_PIP_PACKAGES (space-separated pip requirements, like the
#    EXTRA_R_PACKAGES knob of R doRedis's Helm chart): when non-empty they are
#    installed with `pip install --user`, i.e. into PYTHONUSERBASE
#    (/home/doredis/.local in the image).  That works with a read-only root
#    filesystem as long as $HOME (or PYTHONUSERBASE) and /tmp are writable,
#    e.g. emptyDir volumes in Kubernetes.  pip's own environment variables
#    (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, ...) pass through.
#    If the install fails the container exits non-zero and starts nothing.
#    Every start repeats the install: for big clusters bake the packages into
#    a derived image instead (FROM doredis / RUN pip install ...).
#
# 2. The command: doredis subcommands and options run as `doredis ARGS...`
#    (`worker`, `demo`, `ping`, `alive`, `--help`, ...); a first argument that is a
#    program on PATH (`python /scripts/driver.py`, `sh`, `doredis ...`) runs
#    as given.  Either way it is exec'ed, so signals reach it directly.
set -eu

if [ -n "${EXTRA_PIP_PACKAGES:-}" ]; then
    echo "doredis-entrypoint: pip install --user ${EXTRA_PIP_PACKAGES}" >&2
    # Word splitting of the list is wanted; globbing (e.g. of "pkg[extra]") is not.
    set -f
    status=0
    # shellcheck disable=SC2086
    "${DOREDIS_PYTHON:-python}" -m pip install --user --no-warn-script-location \
        ${EXTRA_PIP_PACKAGES} >&2 || status=$?
    set +f
    if [ "${status}" -ne 0 ]; then
        echo "doredis-entrypoint: ERROR: installing EXTRA_PIP_PACKAGES failed" \
             "(pip exit status ${status}); not starting '$*'" >&2
        exit "${status}"
    fi
fi

if [ "$#" -eq 0 ]; then
    set -- doredis
else
    case "$1" in
        # doredis subcommands always go to doredis, even if a program of the
        # same name (ping!) happens to be on PATH.
        worker | ping | alive | demo | status | scale | local | cancel | purge | exporter | -*)
            set -- doredis "$@"
            ;;
        *)
            if ! command -v "$1" >/dev/null 2>&1; then
                set -- doredis "$@"
            fi
            ;;
    esac
fi

exec "$@"
