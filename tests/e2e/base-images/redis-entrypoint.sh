#!/bin/sh
# Equivalent of the official redis image's docker-entrypoint.sh.
set -e

# `docker run redis --flag` or `docker run redis /path/redis.conf`: prepend redis-server.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ]; then
	shift
	# The official image is built with protected mode off; Debian's binary is not.
	# Turn it off unless a config file is given (which then decides).
	if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
		conf=$1; shift
		set -- redis-server "$conf" "$@"
	else
		set -- redis-server --protected-mode no "$@"
	fi
	# Drop to the redis user, like the official image does with gosu.
	if [ "$(id -u)" = '0' ]; then
		find . \! -user redis -exec chown redis '{}' + 2>/dev/null || true
		umask 0077
		exec setpriv --reuid=redis --regid=redis --init-groups "$@"
	fi
fi

exec "$@"
