#!/usr/bin/env bash
# Set up (Debian packages, .venv) and run the whole test suite, slow ones included, then lint.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not lab" for the fast inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/start-databases.sh >/dev/null
.venv/bin/ruff check kasched plugins tests bench
bash scripts/typecheck.sh
.venv/bin/python -m pytest -p no:cacheprovider --durations=40 "$@"
