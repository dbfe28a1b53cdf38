#!/usr/bin/env bash
# Build the container images Cloudlet's tests and examples need, without Docker Hub:
#   python:3.11-slim (+ tags python:3.11, python:3.10, python:3)  from debootstrap
#   busybox:latest                                                from Debian's busybox-static
#   cloudlet-testapp:latest                                       from tests/apps/testapp/
#   hello:latest                                                  from examples/hello/
#
# Usage: scripts/build-images.sh [--force] [IMAGE...]
#   IMAGE is one of: python busybox testapp hello (default: all of them, in that order).
#   An image whose tag already exists is skipped unless --force. The debootstrapped rootfs is
#   cached under $CLOUDLET_IMAGE_CACHE (default /var/cache/cloudlet-images) and reused even
#   with --force; delete that directory to start from scratch.
# Needs root, docker, debootstrap and busybox-static (scripts/setup.sh installs them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CLOUDLET_IMAGE_CACHE:-/var/cache/cloudlet-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PY_TAGS=(python:3.11-slim python:3.11 python:3.10 python:3)

FORCE=0
WANT=()
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    python|busybox|testapp|hello) WANT+=("$arg") ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[[ ${#WANT[@]} -gt 0 ]] || WANT=(python busybox testapp hello)

log() { echo "build-images: $*" >&2; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }
OLD_IDS=()  # images replaced by --force, removed at the end if nothing uses them any more
skip() {  # skip TAG: true (and says so) if TAG exists and we are not forced
  if [[ $FORCE == 0 ]] && exists "$1"; then log "$1 already exists, skipping (--force rebuilds)"; return 0; fi
  OLD_IDS+=("$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)")
  return 1
}

mkdir -p "$CACHE"
# Serialise concurrent runs (e.g. tests calling this while CI setup runs it).
exec 9>"$CACHE/.lock"
flock 9

# Import a rootfs directory as an image. /dev, /proc and /sys contents are left out: the
# runtime mounts its own.
import_rootfs() {  # import_rootfs DIR TAG --change ... 
  local dir=$1 tag=$2; shift 2
  tar --numeric-owner -C "$dir" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
    | docker import "$@" - "$tag" >/dev/null
}

build_python() {
  if skip python:3.11-slim; then
    for t in "${PY_TAGS[@]:1}"; do exists "$t" || docker tag python:3.11-slim "$t"; done
    return
  fi
  local rootfs=$CACHE/python-$SUITE
  if [[ ! -x $rootfs/usr/bin/python3 ]]; then
    # Build into a temporary dir and rename at the end, so an interrupted run never leaves a
    # half-made rootfs that later runs would trust.
    local tmp=$rootfs.tmp
    rm -rf "$tmp"
    log "debootstrap $SUITE into $tmp (about a minute)"
    local pkgs=python3,python3-venv,python3-pip,ca-certificates
    if ! debootstrap --variant=minbase --include=$pkgs,python-is-python3 $SUITE "$tmp" "$MIRROR" >&2; then
      log "debootstrap with python-is-python3 failed; retrying without it"
      # debootstrap leaves /proc etc. mounted when it fails half-way
      umount -R "$tmp/proc" "$tmp/sys" 2>/dev/null || true
      rm -rf "$tmp"
      debootstrap --variant=minbase --include=$pkgs $SUITE "$tmp" "$MIRROR" >&2
    fi
    [[ -e $tmp/usr/bin/python ]] || ln -s python3 "$tmp/usr/bin/python"
    # Like the official image: `pip install` into the system Python is allowed (PEP 668).
    rm -f "$tmp"/usr/lib/python3*/EXTERNALLY-MANAGED
    # Nothing from the host's pip configuration may leak in (debootstrap copies none, but
    # make sure), nor apt caches, docs or the host's resolver/hostname files.
    rm -rf "$tmp/etc/pip.conf" "$tmp/etc/xdg/pip" "$tmp/root/.config/pip" "$tmp/root/.cache" \
      "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* \
      "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/info/* \
      "$tmp"/var/log/*.log "$tmp/var/log/apt" "$tmp/var/log/bootstrap.log"
    : >"$tmp/etc/resolv.conf"
    echo localhost >"$tmp/etc/hostname"
    find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
    mv "$tmp" "$rootfs"
  else
    log "reusing cached rootfs $rootfs"
  fi
  # pip in containers can reach PyPI only through the CAs this host trusts (which may
  # include a local egress proxy's CA), so ship the host's current bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  log "importing python:3.11-slim"
  import_rootfs "$rootfs" python:3.11-slim \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'CMD ["python3"]'
  for t in "${PY_TAGS[@]:1}"; do docker tag python:3.11-slim "$t"; done
  docker run --rm --network none python:3.11-slim python -c 'import ssl, venv, pip' \
    || { log "python:3.11-slim does not work"; return 1; }
}

build_busybox() {
  skip busybox:latest && return
  local bb=/bin/busybox
  [[ -x $bb ]] || { log "$bb missing: apt-get install busybox-static"; return 1; }
  local dir
  dir=$(mktemp -d "$CACHE/busybox.XXXXXX")
  log "assembling busybox rootfs"
  mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var}
  cp "$bb" "$dir/bin/busybox"
  # Same result as `busybox --install -s`, which would need /proc/self/exe inside a chroot.
  local applet
  for applet in $("$bb" --list-full); do
    [[ -e $dir/$applet ]] || ln -s /bin/busybox "$dir/$applet"
  done
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
  import_rootfs "$dir" busybox:latest --change 'CMD ["sh"]'
  rm -rf "$dir"
  docker run --rm --network none busybox:latest sh -c 'test -k /tmp && echo ok >/dev/null' \
    || { log "busybox:latest does not work"; return 1; }
}

build_dockerfile() {  # build_dockerfile TAG DIR
  skip "$1" && return
  log "docker build -t $1 $2"
  docker build -t "$1" "$2" >&2
}

for img in "${WANT[@]}"; do
  start=$SECONDS
  case $img in
    python) build_python ;;
    busybox) build_busybox ;;
    testapp) build_dockerfile cloudlet-testapp:latest "$ROOT/tests/apps/testapp" ;;
    hello) build_dockerfile hello:latest "$ROOT/examples/hello" ;;
  esac
  log "$img: done in $((SECONDS - start)) s"
done

# Children were rebuilt after their parents, so remove the old ones newest first; docker
# refuses (and we ignore) any that is still tagged or used by a container.
for ((i = ${#OLD_IDS[@]} - 1; i >= 0; i--)); do
  if [[ -n ${OLD_IDS[i]} ]]; then docker rmi "${OLD_IDS[i]}" >/dev/null 2>&1 || true; fi
done
