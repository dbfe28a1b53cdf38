#!/usr/bin/env bash
# The main job from nothing: set the machine up, start `cloudlet server` in the background,
# deploy examples/hello and curl it. Rerunnable. Stop the server with: kill $(cat $HOME_DIR/server.pid)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
export CLOUDLET_HOME=${CLOUDLET_HOME:-$HOME/.local/share/cloudlet}
mkdir -p "$CLOUDLET_HOME"
if ! curl -fsS "http://127.0.0.1:${CLOUDLET_API_PORT:-8090}/healthz" >/dev/null 2>&1; then
  echo "quickstart: starting cloudlet server (log: $CLOUDLET_HOME/server.log)" >&2
  rm -f "$CLOUDLET_HOME/server.json"
  setsid cloudlet server >>"$CLOUDLET_HOME/server.log" 2>&1 </dev/null &
  echo $! >"$CLOUDLET_HOME/server.pid"
  for _ in $(seq 100); do [[ -f $CLOUDLET_HOME/server.json ]] && break; sleep 0.2; done
fi
cloudlet run deploy hello --image hello --allow-unauthenticated
curl -sS --retry 3 "http://hello.localhost:${CLOUDLET_PORT:-8080}/"
