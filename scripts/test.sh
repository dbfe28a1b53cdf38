#!/usr/bin/env bash
# The project's one test command (CI runs it after scripts/setup.sh). Extra arguments go to
# pytest, e.g. scripts/test.sh tests/unit -x
# Integration tests mostly wait on dockerd and timers, so three workers (one test file each:
# module-scoped servers stay in one worker) finish in about half the serial time.
# pytest-benchmark, if installed, refuses to run under xdist: it is not used here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 3 --dist loadfile "$@"
