#!/usr/bin/env bash
# Set up (Debian packages, .venv) and run the whole test suite, slow ones included, then lint.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not lab" for the fast inner loop.
#
# Without arguments the suite runs as two pytest processes at once: the tests that build a lab or
# start a scheduler (marks lab, slurm, oar: mostly waiting on boots, timeouts and the schedulers'
# own periods), and, niced so that it takes only the CPU the first leaves idle, every other test.
# The second's output is printed after the first's; the run fails when either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/start-databases.sh >/dev/null
.venv/bin/ruff check kasched plugins tests bench
bash scripts/typecheck.sh
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider --durations=40)
if [ "$#" -gt 0 ]; then
    exec "${PYTEST[@]}" "$@"
fi
MACHINE="lab or slurm or oar"
host_log=$(mktemp /tmp/kasched-host-tests.XXXXXX)
trap 'rm -f "$host_log"' EXIT
# A script's background command starts with SIGINT and SIGQUIT ignored, and so would every process the
# tests start (a test that interrupts one would wait forever): give them back their default.
env --default-signal=INT,QUIT nice -n 10 "${PYTEST[@]}" -m "not ($MACHINE)" >"$host_log" 2>&1 &
host=$!
machine_status=0
# The schedulers' tests (mostly waiting) first, the QEMU and hostile-node ones (e2e: busy CPUs) last,
# once the other process is likely done: niced, it would get little CPU beside QEMU under TCG.
first=(tests/schedulers)
for path in tests/*/ tests/test_*.py; do
    case "$path" in tests/schedulers/|tests/e2e/|tests/__pycache__/) ;; *) first+=("${path%/}") ;; esac
done
"${PYTEST[@]}" -m "$MACHINE" "${first[@]}" tests/e2e || machine_status=$?
host_status=0
wait "$host" || host_status=$?
echo "=== the tests without a lab or a scheduler (run at the same time, niced) ==="
cat "$host_log"
echo "=== exit: lab and schedulers $machine_status, the others $host_status ==="
[ "$machine_status" -eq 0 ] && [ "$host_status" -eq 0 ]
