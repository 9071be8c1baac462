#!/bin/sh
# PID 1 of refresher/postgres: the official postgres image's contract, for a Debian-built server.
#
# Honours POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_INITDB_ARGS, POSTGRES_HOST_AUTH_METHOD and
# PGDATA; runs /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz once, on an empty data directory, against a
# server listening on the Unix socket only (so nothing outside connects before init is complete); then execs
# postgres as the postgres user, so it is PID 1 and receives `docker stop`'s signal itself.
#
# The initialisation is made in $PGDATA/.refresher-init and moved into $PGDATA once complete, PG_VERSION last:
# a container stopped midway (compose recreating it: PID 1, this shell, ignores SIGINT, so Docker kills it 10 s
# later; an OOM kill; a reboot) left initdb's PG_VERSION in $PGDATA, so the next start skipped the rest and ran
# a cluster without listen_addresses = '*' (healthy to pg_isready inside the container, while every login
# through the published port got "server closed the connection unexpectedly"), or without POSTGRES_DB and the
# init scripts' work. A staging directory found at start is such an interrupted initialisation: made again.
set -eu

[ "${1#-}" != "$1" ] && set -- postgres "$@"
[ "$1" = postgres ] || exec "$@"

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

# As root: own the data and socket directories, then come back as postgres (setpriv is util-linux,
# which minbase always has).
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chmod 00700 "$PGDATA" || :
  chmod 03775 /var/run/postgresql || :
  find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' + 2>/dev/null || chown -R postgres:postgres "$PGDATA"
  chown postgres:postgres /var/run/postgresql
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

staging=$PGDATA/.refresher-init
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # What is in $PGDATA besides a mount point's lost+found: ours when the staging directory is there (an
  # initialisation starts on an empty $PGDATA only), anything else is not a cluster of ours to replace.
  if [ -d "$staging" ]; then
    echo "$0: an earlier initialisation of $PGDATA was interrupted; making it again"
    find "$PGDATA" -mindepth 1 -maxdepth 1 ! -name lost+found -exec rm -rf '{}' +
  elif [ -n "$(find "$PGDATA" -mindepth 1 -maxdepth 1 ! -name lost+found -print -quit)" ]; then
    echo >&2 "error: $PGDATA holds files but no PG_VERSION: not a cluster, and not empty to make one in."
    exit 1
  fi
  : "${POSTGRES_USER:=postgres}"
  : "${POSTGRES_DB:=$POSTGRES_USER}"
  : "${POSTGRES_INITDB_ARGS:=}"
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
    echo >&2 "error: database is uninitialized and superuser password is not specified."
    echo >&2 "       Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust to allow all connections without one)."
    exit 1
  fi
  auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  target=$PGDATA
  export PGDATA="$staging"  # the init scripts' $PGDATA too (they may edit its postgresql.conf)
  # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of words, as in the official image
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" $POSTGRES_INITDB_ARGS
  rm -f "$pwfile"
  printf '\nlisten_addresses = '"'"'*'"'"'\n' >>"$PGDATA/postgresql.conf"
  printf '\nhost all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"

  # The init server listens on the socket only; clients waiting on TCP cannot see it.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start
  export PGPASSWORD="${POSTGRES_PASSWORD:-}"
  psql_init() { psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --username "$POSTGRES_USER" "$@"; }
  if [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE :\"db\";" | psql_init --dbname postgres --set db="$POSTGRES_DB"
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    [ -e "$f" ] || continue
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then echo "$0: running $f"; "$f"
        else echo "$0: sourcing $f"; . "$f"; fi ;;
      *.sql) echo "$0: running $f"; psql_init --dbname "$POSTGRES_DB" -f "$f" ;;
      *.sql.gz) echo "$0: running $f"; gzip -dc "$f" | psql_init --dbname "$POSTGRES_DB" ;;
      *) echo "$0: ignoring $f" ;;
    esac
  done
  unset PGPASSWORD
  pg_ctl -D "$PGDATA" -m fast -w stop
  # Renames within one file system; PG_VERSION, the mark of a cluster, comes last.
  find "$staging" -mindepth 1 -maxdepth 1 ! -name PG_VERSION -exec mv -t "$target" '{}' +
  mv "$staging/PG_VERSION" "$target/PG_VERSION"
  export PGDATA="$target"
  echo
  echo "PostgreSQL init process complete; ready for start up."
  echo
fi
# Stopped between the last two renames: the staging directory is left empty.
rmdir "$staging" 2>/dev/null || :

exec "$@"
