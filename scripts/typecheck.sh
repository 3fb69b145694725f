#!/usr/bin/env bash
# mypy --strict (settings in pyproject.toml) on kasched/ and the scheduler plugins. The plugins live in
# plugins/<name>/ but are imported as kasched_<name>: mypy reads them through links of those names.
set -euo pipefail
cd "$(dirname "$0")/.."
named=$(mktemp -d)
trap 'rm -rf "$named"' EXIT
for plugin in slurm oar pbs; do
    ln -s "$PWD/plugins/$plugin" "$named/kasched_$plugin"
done
MYPYPATH=$named .venv/bin/mypy -p kasched -p kasched_slurm -p kasched_oar -p kasched_pbs
