#!/usr/bin/env bash
# `make up`, `make compose-down`, `make compose-ps`: this checkout's compose project, air-gapped.
#
# The Makefile passes COMPOSE (the compose command it found) and COMPOSE_PROJECT (refresher-<sha256 of the
# checkout path, 10 hex>, the same name refresher computes for --engine compose). Every command touches only
# that project, so checkouts sharing a Docker daemon never stop each other's services.
#
#   up      build the refresher/* images the compose file names when they are missing (offline, like
#           `make image`; also one built from another entrypoint.sh), start the services, wait until both
#           are healthy and a login through Postgres's published port works, print their addresses.
#           Running it again changes nothing.
#   down    remove the project's containers, network and volumes. Running it again changes nothing.
#   ps      print the addresses.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${COMPOSE:?COMPOSE is set by the Makefile}" "${COMPOSE_PROJECT:?COMPOSE_PROJECT is set by the Makefile}"
read -r -a compose <<<"$COMPOSE"
compose+=(-p "$COMPOSE_PROJECT" -f compose/docker-compose.yml)
PG_IMAGE=${REFRESHER_PG_IMAGE:-refresher/postgres:15}
REDIS_IMAGE=${REFRESHER_REDIS_IMAGE:-refresher/redis:7}
WAIT_SECONDS=${WAIT_SECONDS:-90}

die() { printf 'compose.sh: %s\n' "$*" >&2; exit 1; }

image_missing() { ! docker image inspect "$1" >/dev/null 2>&1; }

# build.sh, which does nothing when the images are current, also builds refresher/postgres:15 again when it was
# built from another entrypoint.sh: a fix to the entrypoint reaches the machines whose image predates it.
build_missing_images() {
  local redis=0
  # Only our own tags are built here; any other image is the registry's business.
  if [[ $REDIS_IMAGE == refresher/redis:7 ]] && image_missing "$REDIS_IMAGE"; then redis=1; fi
  if [[ $redis == 1 || $PG_IMAGE == refresher/postgres:15 ]]; then
    WITH_REDIS=$redis QUIET=1 bash compose/image/build.sh
  fi
}

addresses() {
  local pg redis
  pg=$("${compose[@]}" port postgres 5432 2>/dev/null | tail -n1)
  redis=$("${compose[@]}" port redis 6379 2>/dev/null | tail -n1)
  [[ -n $pg ]] || { printf 'compose project %s is not running (make up)\n' "$COMPOSE_PROJECT"; return; }
  printf 'compose project %s\n' "$COMPOSE_PROJECT"
  printf '  postgres  %s  (refresher refresh --profile ui_testing --engine compose)\n' "$pg"
  printf '  redis     redis://%s/0  (the jobs'"'"' default queue while it runs)\n' "$redis"
}

wait_healthy() {
  local ids id state
  mapfile -t ids < <("${compose[@]}" ps -q)
  ((${#ids[@]})) || die "no containers after up"
  for id in "${ids[@]}"; do
    while :; do
      state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
      [[ $state == healthy ]] && break
      if [[ $state == unhealthy || $state == exited || $state == dead ]] || ((SECONDS >= deadline)); then
        docker logs --tail 30 "$id" >&2 || true
        die "container $(docker inspect -f '{{.Name}}' "$id") is $state after ${WAIT_SECONDS}s (log tail above)"
      fi
      sleep 1
    done
  done
}

# Ready is a login through the published port as the container's POSTGRES_USER, with its password, to its
# POSTGRES_DB (compose/pg_login.py): the healthcheck looks from inside the container, and passed for a server that
# no client on the host could log in to (a cluster whose initialisation a stop had cut short).
wait_login() {
  local id address env user password db
  id=$("${compose[@]}" ps -q postgres)
  address=$("${compose[@]}" port postgres 5432 | tail -n1)
  env=$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$id")
  user=$(sed -n 's/^POSTGRES_USER=//p' <<<"$env")
  password=$(sed -n 's/^POSTGRES_PASSWORD=//p' <<<"$env")
  db=$(sed -n 's/^POSTGRES_DB=//p' <<<"$env")
  user=${user:-postgres}
  PGPASSWORD=$password python3 compose/pg_login.py "${address%:*}" "${address##*:}" "$user" "${db:-$user}" \
    "$((deadline > SECONDS ? deadline - SECONDS : 1))" || die "the stack is not ready (line above)"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The host port the project's container of service $1 was made with for container port $2: a port an earlier up
# chose (below) or pinned; empty when Docker picked it, or there is no such container (running or not).
made_with_port() {
  local id
  id=$(service_container "$1" -a)
  [[ -z $id ]] || docker inspect -f "{{range index .HostConfig.PortBindings \"$2/tcp\"}}{{.HostPort}}{{end}}" "$id"
}

# The id of the project's container of service $1 (running; -a: any), empty when there is none.
service_container() {
  local id
  id=$(docker ps "${@:2}" -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT" \
    --filter "label=com.docker.compose.service=$1")
  printf '%s' "${id%%$'\n'*}"
}

# Docker hands out published ports in turn without asking the kernel: when another process listens on its pick,
# the start fails ("address already in use"). Then each port nobody pinned is one the kernel says is free.
# A port nobody pins now is the one the service's container was made with: the compose file with another port
# is another configuration, and compose would recreate the running services (restarting Postgres and Redis
# under their sessions, on new ports) for an up that should change nothing. For the same reason a retry keeps
# the port of a service that started: only the one Docker could not start moves. Moving both recreated a
# Postgres that was still initialising its volume (compose's stop kills it 10 s later, the entrypoint's shell
# ignoring SIGINT), for nothing.
up_services() {
  local try output
  [[ -n $pinned_pg ]] || REFRESHER_PG_PORT=$(made_with_port postgres 5432)
  [[ -n $pinned_redis ]] || REFRESHER_REDIS_PORT=$(made_with_port redis 6379)
  export REFRESHER_PG_PORT REFRESHER_REDIS_PORT
  for try in 1 2 3 4 5; do
    if output=$("${compose[@]}" up -d 2>&1); then
      printf '%s\n' "$output" >&2
      return
    fi
    if [[ $output != *"already in use"* && $output != *"already allocated"* ]] || ((try == 5)) ||
      [[ -n $pinned_pg && -n $pinned_redis ]]; then
      printf '%s\n' "$output" >&2
      die "the services did not start (output above)"
    fi
    [[ -n $pinned_pg || -n $(service_container postgres) ]] || REFRESHER_PG_PORT=$(free_port)
    [[ -n $pinned_redis || -n $(service_container redis) ]] || REFRESHER_REDIS_PORT=$(free_port)
    export REFRESHER_PG_PORT REFRESHER_REDIS_PORT
    printf '== a port Docker picked is held by another process: trying %s (postgres) and %s (redis)\n' \
      "${REFRESHER_PG_PORT:-the port it runs on}" "${REFRESHER_REDIS_PORT:-the port it runs on}" >&2
  done
}
pinned_pg=${REFRESHER_PG_PORT:-}
pinned_redis=${REFRESHER_REDIS_PORT:-}

command -v docker >/dev/null 2>&1 || die "docker is not installed (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start one: dockerd, or systemctl start docker)"

# Two `make up` (or an up and a down) of one project at once take turns: compose checks what exists, then
# creates, so both made the services (postgres_1 and postgres_2, two postmasters on one data volume: each PID 1
# of its own namespace, neither saw the other's postmaster.pid as live) or one failed on the name the other took.
# The lock lives in the checkout's (git-ignored) .refresher, as the project is the checkout's.
lock_project() {
  mkdir -p .refresher
  exec 8>.refresher/compose.lock
  flock 8
}

case ${1:-} in
  up)
    lock_project
    build_missing_images
    up_services
    deadline=$((SECONDS + WAIT_SECONDS))
    wait_healthy
    wait_login
    addresses
    ;;
  down)
    lock_project
    "${compose[@]}" down -v --remove-orphans
    ;;
  ps)
    addresses
    ;;
  *)
    die "usage: compose.sh up|down|ps"
    ;;
esac
