#!/usr/bin/env bash
# The project's one test command (CI runs it after scripts/setup.sh). Extra arguments go to
# pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 -m pytest -q -p no:cacheprovider "$@"
