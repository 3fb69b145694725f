#!/usr/bin/env bash
# Stop what scripts/start-oar.sh started (always succeeds; as root): the jobs, the REST API server,
# Almighty and its children, OAR's sshd; drops OAR's database and roles (the next start numbers jobs
# from 1), puts the original /etc/oar/oar.conf back. Keeps the logs in KASCHED_OAR_DIR/log.
# --purge also removes KASCHED_OAR_DIR (logs, generated kasched site).
set -uo pipefail
dir=${KASCHED_OAR_DIR:-/var/lib/kasched-oar}
conf=/etc/oar/oar.conf
[ "$(id -u)" = 0 ] || { echo "stop-oar: run as root" >&2; exit 0; }
[ -d "$dir" ] || exit 0

if [ -s /var/run/oar-server.pid ] && kill -0 "$(cat /var/run/oar-server.pid)" 2>/dev/null; then
    jobs=$(cd / && timeout 10 oarstat -J 2>/dev/null | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)))' 2>/dev/null)
    [ -z "$jobs" ] || (cd / && timeout 10 oardel $jobs >/dev/null 2>&1)
fi

descendants() {  # descendants PID: its children, their children...
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
stop_tree() {  # stop_tree PIDFILE: TERM the process and its descendants, KILL what is left after 5 s
    local pid pids
    [ -s "$1" ] || return 0
    pid=$(cat "$1" 2>/dev/null)
    case "$pid" in ''|*[!0-9]*) rm -f "$1"; return 0 ;; esac
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    pids="$pid $(descendants "$pid")"
    kill $pids 2>/dev/null
    for _ in $(seq 25); do
        kill -0 $pids 2>/dev/null || break
        sleep 0.2
    done
    kill -9 $pids 2>/dev/null
    rm -f "$1"
}
stop_tree "$dir/api.pid"
stop_tree /var/run/oar-server.pid
stop_tree "$dir/sshd.pid"

if pg_lsclusters -h 2>/dev/null | grep -q online; then
    su postgres -c "psql -qAt" >/dev/null 2>&1 <<'SQL'
DROP DATABASE IF EXISTS oar WITH (FORCE);
DROP ROLE IF EXISTS oar_ro;
DROP ROLE IF EXISTS oar;
SQL
fi
[ -e "$conf.kasched-orig" ] && mv -f "$conf.kasched-orig" "$conf"
if [ "${1:-}" = --purge ]; then rm -rf "$dir"; fi
exit 0
