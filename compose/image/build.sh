#!/usr/bin/env bash
# Build refresher/postgres:15, a look-alike of the official postgres:15 image, from Debian packages only.
#
# Air-gapped machines reach a Debian mirror but no image registry, so no `docker pull` ever works there:
# debootstrap a minimal bookworm with postgresql-15, trim it, and build `FROM scratch` with the metadata the
# official image carries (ENV, ENTRYPOINT, CMD, EXPOSE, STOPSIGNAL, VOLUME). The entrypoint (entrypoint.sh)
# honours the same POSTGRES_* variables and /docker-entrypoint-initdb.d scripts.
#
# Idempotent: does nothing when the tag exists and was built from this entrypoint.sh (its sha256 is the
# io.refresher.entrypoint label: an image from an older one is built again; FORCE=1 rebuilds). The downloaded packages and the trimmed
# root filesystem are cached under $REFRESHER_CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/refresher), so
# a rebuild needs no network at all; delete that directory to fetch fresh packages.
#
# Variables: IMAGE (refresher/postgres), PG_MAJOR (15), SUITE (bookworm), MIRROR (the Debian mirror this
# machine's apt uses, else deb.debian.org), FORCE=1, WITH_REDIS=1 (also build refresher/redis:7 from
# Debian's redis-server, for compose on air-gapped machines), QUIET=1 (no word when the images are current).
set -euo pipefail

IMAGE=${IMAGE:-refresher/postgres}
PG_MAJOR=${PG_MAJOR:-15}
SUITE=${SUITE:-bookworm}
CACHE_DIR=${REFRESHER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/refresher}
HERE=$(cd "$(dirname "$0")" && pwd)

SCRATCH=()
cleanup() { if ((${#SCRATCH[@]})); then rm -rf "${SCRATCH[@]}"; fi; }
trap cleanup EXIT

die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }
log() { printf '== %s\n' "$*" >&2; }

# The mirror this machine's apt already uses (deb822 sources first, then the classic list), so debootstrap
# goes exactly where apt is allowed to go.
detect_mirror() {
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  if [[ -z $uri ]]; then
    uri=$(grep -hsE '^deb +(\[[^]]*\] +)?https?://' /etc/apt/sources.list | sed -E 's/^deb +(\[[^]]*\] +)?//' \
      | awk '{print $1}' | grep -E '/debian/?$' | head -n1 || true)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${MIRROR:-$(detect_mirror)}

command -v docker >/dev/null 2>&1 || die "docker is not installed (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start one: dockerd, or systemctl start docker)"
# Debian's docker.io ships no buildx; the classic builder handles FROM scratch + ADD without any registry.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

ENTRYPOINT_SHA=$(sha256sum <"$HERE/entrypoint.sh" | cut -c1-64)
entrypoint_current() {
  [[ $(docker image inspect -f '{{index .Config.Labels "io.refresher.entrypoint"}}' "$1" 2>/dev/null) == "$ENTRYPOINT_SHA" ]]
}

# Two checkouts' `make image` (or `make up`) at once take turns, one lock per cache dir: they would write the
# same .part files in the cache, and both build the tag. The second finds the tag the first built.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/build.lock"
flock 9

# rootfs_tar NAME PACKAGES...: sets ROOTFS_TAR to a trimmed minbase root filesystem tarball, cached by name.
rootfs_tar() {
  local name=$1; shift
  local packages; packages=$(IFS=,; echo "$*")
  local debs="$CACHE_DIR/$name-$SUITE-debs.tgz"
  ROOTFS_TAR="$CACHE_DIR/$name-$SUITE-rootfs.tar"
  if [[ -s $ROOTFS_TAR && ${FORCE:-0} != 1 ]]; then
    log "reusing $ROOTFS_TAR"
    return
  fi
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (Debian: apt-get install debootstrap)"
  [[ $(id -u) == 0 ]] || die "debootstrap needs root (run: sudo make image)"
  mkdir -p "$CACHE_DIR"
  if [[ ! -s $debs ]]; then
    log "downloading $packages from $MIRROR (cached in $debs)"
    local scratch; scratch=$(mktemp -d)
    local part="${debs%.tgz}.part.tgz"   # debootstrap picks the format from the extension
    SCRATCH+=("$scratch" "$part")
    debootstrap --variant=minbase --include="$packages" --make-tarball="$part" "$SUITE" "$scratch" "$MIRROR" >&2 \
      || die "debootstrap could not download from $MIRROR"
    mv "$part" "$debs"
  fi
  local dir; dir=$(mktemp -d "$CACHE_DIR/$name-rootfs.XXXXXX")
  SCRATCH+=("$dir" "$ROOTFS_TAR.part")
  log "installing $packages into $dir"
  debootstrap --variant=minbase --include="$packages" --unpack-tarball="$debs" "$SUITE" "$dir" "$MIRROR" >&2 \
    || die "debootstrap failed (see $dir/debootstrap/debootstrap.log)"
  trim_rootfs "$dir"
  tar --numeric-owner -C "$dir" -cf "$ROOTFS_TAR.part" .
  mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
}

# What a database container never needs: apt's state and caches, docs, man pages, locale sources, perl's
# non-essential modules (only postgresql-common's cluster tools use them), and the LLVM JIT with its
# dependencies (~130 MB; refresher's work is bulk COPY and plain scans, and postgres runs fine without a JIT
# provider: it only tries to load one for a query above jit_above_cost, and falls back silently).
trim_rootfs() {
  local dir=$1
  rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/var/log/* "$dir"/debootstrap \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/lintian \
    "$dir"/usr/share/locale/* "$dir"/usr/share/i18n
  if [[ -d $dir/usr/lib/postgresql ]]; then
    rm -rf "$dir"/usr/lib/postgresql/*/lib/llvmjit* "$dir"/usr/lib/postgresql/*/lib/bitcode \
      "$dir"/usr/lib/*/libLLVM* "$dir"/usr/lib/*/libz3.so* "$dir"/usr/lib/llvm-* \
      "$dir"/usr/lib/*/perl "$dir"/usr/share/perl "$dir"/usr/share/postgresql/*/man
    # /usr/bin/psql and friends point at Debian's perl pg_wrapper: point them at the binaries instead.
    local link target
    for link in "$dir"/usr/bin/*; do
      [[ -L $link && $(readlink "$link") == ../share/postgresql-common/pg_wrapper ]] || continue
      target=/usr/lib/postgresql/$PG_MAJOR/bin/$(basename "$link")
      if [[ -e $dir$target ]]; then ln -sfn "$target" "$link"; else rm -f "$link"; fi
    done
    # The package's own cluster (postgresql-common creates one on install); the entrypoint makes PGDATA.
    rm -rf "$dir"/var/lib/postgresql/* "$dir"/etc/postgresql/*
    install -d -o "$(chroot "$dir" id -u postgres)" -g "$(chroot "$dir" id -g postgres)" -m 3775 \
      "$dir"/var/run/postgresql
    install -d -m 755 "$dir"/docker-entrypoint-initdb.d
  fi
  if [[ -x $dir/usr/bin/redis-server ]]; then
    install -d -o "$(chroot "$dir" id -u redis)" -g "$(chroot "$dir" id -g redis)" -m 755 "$dir"/data
  fi
}

# build_image TAG ROOTFS_TAR DOCKERFILE_LINES...: FROM scratch, the rootfs, then the given lines.
build_image() {
  local tag=$1 tar=$2; shift 2
  local stage; stage=$(mktemp -d)
  SCRATCH+=("$stage")
  ln "$tar" "$stage/rootfs.tar" 2>/dev/null || cp "$tar" "$stage/rootfs.tar"
  cp "$HERE/entrypoint.sh" "$stage/entrypoint.sh"
  { printf 'FROM scratch\nADD rootfs.tar /\n'; printf '%s\n' "$@"; } >"$stage/Dockerfile"
  log "building $tag"
  docker build -q -t "$tag" "$stage" >/dev/null 2> >(grep -v -e DEPRECATED -e 'legacy builder' -e BuildKit -e 'environment-variable' -e '^$' >&2) \
    || die "docker build of $tag failed"
}

build_postgres() {
  local tag="$IMAGE:$PG_MAJOR"
  if entrypoint_current "$tag" && [[ ${FORCE:-0} != 1 ]]; then
    [[ ${QUIET:-0} == 1 ]] || log "$tag already exists (FORCE=1 to rebuild)"
  else
    if image_exists "$tag"; then log "$tag was built from another entrypoint.sh: building it again"; fi
    rootfs_tar "postgresql-$PG_MAJOR" "postgresql-$PG_MAJOR"
    build_image "$tag" "$ROOTFS_TAR" \
      'COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh' \
      'RUN ["/bin/ln", "-s", "usr/local/bin/docker-entrypoint.sh", "/docker-entrypoint.sh"]' \
      "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      "ENV PG_MAJOR=$PG_MAJOR LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data" \
      'VOLUME /var/lib/postgresql/data' \
      'ENTRYPOINT ["docker-entrypoint.sh"]' \
      'CMD ["postgres"]' \
      'EXPOSE 5432' \
      'STOPSIGNAL SIGINT' \
      "LABEL io.refresher.project=refresher io.refresher.entrypoint=$ENTRYPOINT_SHA org.opencontainers.image.description=\"PostgreSQL $PG_MAJOR from Debian $SUITE, compatible with the official postgres image\""
    log "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
  fi
  docker tag "$tag" "$IMAGE:latest"
}

build_redis() {
  local tag=refresher/redis:7
  if image_exists "$tag" && [[ ${FORCE:-0} != 1 ]]; then
    [[ ${QUIET:-0} == 1 ]] || log "$tag already exists (FORCE=1 to rebuild)"
    return
  fi
  rootfs_tar redis-server redis-server
  build_image "$tag" "$ROOTFS_TAR" \
    'WORKDIR /data' \
    'USER redis' \
    'ENTRYPOINT ["redis-server"]' \
    'CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]' \
    'EXPOSE 6379' \
    'LABEL io.refresher.project=refresher'
  log "built $tag"
}

build_postgres
if [[ ${WITH_REDIS:-0} == 1 ]]; then build_redis; fi
