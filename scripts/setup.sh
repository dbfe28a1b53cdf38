#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to develop and test Cloudlet: system packages, a
# running dockerd, the container images, and the project installed in editable mode.
# Safe to rerun: every step skips what is already done. .ci/run = this + scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(docker.io debootstrap busybox-static haproxy wrk curl ca-certificates iproute2)
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/cloudlet-dockerd.log}
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1
# Debian's own python3 refuses system-wide pip installs (PEP 668); this is a throwaway CI or
# dev machine, so allow it. Ignored by other Pythons (pyenv, venv).
export PIP_BREAK_SYSTEM_PACKAGES=1

log() { echo "setup: $*" >&2; }
phase() {  # phase NAME COMMAND...: run a step and say how long it took
  local name=$1 start=$SECONDS
  shift
  log "$name ..."
  "$@"
  log "$name: done in $((SECONDS - start)) s"
}

install_packages() {
  local want=("${PACKAGES[@]}")
  # Without a usable pip (a bare Debian), take Debian's python3.
  python3 -m pip --version >/dev/null 2>&1 || want+=(python3 python3-pip python3-venv)
  local missing=()
  for p in "${want[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then log "all packages already installed"; return; fi
  apt-get update
  apt-get install -y "${missing[@]}"
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then log "dockerd already running"; return; fi
  log "starting dockerd (log: $DOCKERD_LOG)"
  # setsid: dockerd must outlive this script and not share its signals
  setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    kill -0 "$pid" 2>/dev/null || break  # it died: no point waiting
    sleep 1
  done
  log "dockerd did not come up (within 60 s); its log:"
  cat "$DOCKERD_LOG" >&2
  return 1
}

# gcloud puts the region in front of the API host it is pointed at (`cloudlet gcloud-config`),
# so these names must resolve to the control API's address.
HOSTS_LINE="127.0.0.1 europe-west1-cloudlet.local us-central1-cloudlet.local cloudlet.local"
hosts_entry() {
  if getent hosts europe-west1-cloudlet.local >/dev/null; then log "hosts entry present"; return; fi
  echo "$HOSTS_LINE" >>/etc/hosts
}

phase "system packages" install_packages
phase "dockerd" start_dockerd
phase "container images" bash scripts/build-images.sh
phase "python packages" python3 -m pip install -e '.[test]'
phase "hosts entry for gcloud" hosts_entry
