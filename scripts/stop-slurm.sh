#!/usr/bin/env bash
# Stop what scripts/start-slurm.sh started (always succeeds; as root): the stand-in slurmds recorded by
# kasched's Slurm hooks, every slurmd and slurmctld of KASCHED_SLURM_DIR (by their pid files), and munged
# if start-slurm.sh started it. Forgets Slurm's job state (the next start is clean), keeps the logs.
# --purge also removes KASCHED_SLURM_DIR (logs, generated kasched site).
# KASCHED_SLURM_NETNS: the network namespace start-slurm.sh ran in (the Slurm commands run there; if
# it is gone already, the daemons are still found by their pid files).
set -uo pipefail
dir=${KASCHED_SLURM_DIR:-/var/lib/kasched-slurm}
[ "$(id -u)" = 0 ] || { echo "stop-slurm: run as root" >&2; exit 0; }
[ -d "$dir" ] || exit 0
if [ -n "${KASCHED_SLURM_NETNS:-}" ] && [ "${KASCHED_SLURM_IN_NETNS:-}" != "$KASCHED_SLURM_NETNS" ] &&
    ip netns list | awk '{print $1}' | grep -qxF "$KASCHED_SLURM_NETNS"; then
    export KASCHED_SLURM_IN_NETNS=$KASCHED_SLURM_NETNS
    exec nsenter --net="/run/netns/$KASCHED_SLURM_NETNS" bash "$0" "$@"  # keeps the mounts (/sys/fs/cgroup)
fi

export SLURM_CONF=$dir/slurm.conf
if [ -e "$SLURM_CONF" ] && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
    [ -z "$jobs" ] || timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 25); do
        [ -z "$(timeout 10 squeue -h -t running,completing,configuring -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
fi

pids=()
add_pid() {  # add_pid PID: a live process of ours
    case "$1" in ''|*[!0-9]*) return ;; esac
    kill -0 "$1" 2>/dev/null && pids+=("$1")
}
for record in "$dir"/standin/job-*.json "$dir"/standin/job-*.releasing; do
    [ -e "$record" ] || continue
    for pid in $(grep -o '"pid": *[0-9]*' "$record" | grep -o '[0-9]*$'); do add_pid "$pid"; done
done
descendants() {  # descendants PID: its children, their children...
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
# slurmstepd of jobs whose slurmd was killed (the tests' "user system") listen on sockets in the spool.
for pid in $(ss -xlpn 2>/dev/null | grep -F "$dir/slurmd/" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    add_pid "$pid"
    for child in $(descendants "$pid"); do add_pid "$child"; done
done
for pidfile in "$dir"/standin/keeper.pid "$dir"/slurmd/*.pid "$dir"/slurmctld.pid; do
    [ -e "$pidfile" ] && add_pid "$(cat "$pidfile" 2>/dev/null)"
done
if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 50); do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null; done
fi
# Slurm numbers jobs from 1 again without its state: the generated kasched site (grants by job id) goes too.
rm -rf "$dir/ctld" "$dir/slurmd" "$dir/standin" "$dir/kasched"
rm -f "$dir/slurmctld.pid"

# munged is shared by every Slurm on this host (its socket is a file): left running while another
# slurmctld (another cluster, a lab's, a test's) still needs it.
if [ -e "$dir/munged.started" ] && ! pgrep -x slurmctld >/dev/null; then
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    case "$pid" in ''|*[!0-9]*) ;; *) kill -TERM "$pid" 2>/dev/null ;; esac
    rm -f "$dir/munged.started"
fi
if [ "${1:-}" = --purge ]; then
    rm -rf "$dir"
fi
exit 0
