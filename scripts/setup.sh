#!/usr/bin/env bash
# Install what kasched needs on a Debian 12 machine, as root: the Debian packages listed in
# scripts/packages/*.txt (skipped when already installed), and a virtualenv in .venv with kasched
# installed from pyproject.toml (editable, so the scheduler plugins' entry points are registered).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "setup: run as root (it installs Debian packages)" >&2; exit 1; }

packages=$(cat scripts/packages/*.txt | sed 's/#.*//' | tr -s ' \n' '\n' | sort -u | grep -v '^$' || true)
missing=()
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # Services must not start at install time (no init system here): the tests start what they need.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/kasched-apt.log 2>&1 ||
        { tail -20 /tmp/kasched-apt.log >&2; echo "setup: apt-get install failed (log: /tmp/kasched-apt.log)" >&2; exit 1; }
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.kasched-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e '.[test]' >/tmp/kasched-pip.log 2>&1 ||
        { tail -20 /tmp/kasched-pip.log >&2; echo "setup: pip install failed" >&2; exit 1; }
    .venv/bin/python -c "import kasched, kasched_slurm" || { echo "setup: kasched did not install" >&2; exit 1; }
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/kasched)"
