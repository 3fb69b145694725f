#!/usr/bin/env bash
# Bring up a one-host Slurm 22.05 cluster wired to kasched (idempotent; as root):
#   munged, slurmctld, and one `slurmd -N nI` per node n1..nN on 127.0.0.1 (ports BASE+1..BASE+N),
#   a generated slurm.conf (nodes with Feature=deploy, PrologSlurmctld/EpilogSlurmctld running kasched's
#   Slurm hooks, plugins/slurm/hooks.py, through wrappers that set their environment; job_submit/lua from
#   plugins/slurm; stand-in slurmds on 127.0.0.2 for deploy jobs, see docs/slurm.md),
#   a kasched site (config, SQLite state, inventory of the nodes) unless KASCHED_CONFIG names one,
#   and an ordinary user to submit jobs (root may submit too, but tests act as a user).
# Settings (environment):
#   KASCHED_SLURM_DIR      where everything lives (default /var/lib/kasched-slurm)
#   KASCHED_SLURM_NODES    number of nodes (default 4)
#   KASCHED_SLURMD_TIMEOUT SlurmdTimeout in seconds (default 300; tests use a short one, e.g. 6)
#   KASCHED_SLURM_PORT     base port: slurmctld on BASE, slurmd nI on BASE+I (default 16800)
#   KASCHED_SLURM_USER     the ordinary user created for submitting (default kasched-slurm-user)
#   KASCHED_CONFIG         kasched config the hooks use (default: a site generated under the dir)
#   KASCHED                the kasched command (default: .venv/bin/kasched of this checkout)
#   KASCHED_SLURM_STANDIN_ADDR  loopback address of the stand-in slurmds (default 127.0.0.2; "none":
#                          no stand-ins, deploy nodes then go DOWN after SlurmdTimeout like any node)
#   KASCHED_SLURM_NODE_PREFIX   node names are PREFIX1..PREFIXN (default n; node- for a lab's nodes)
#   KASCHED_SLURM_NETNS    run everything inside this network namespace (a lab's kl-NAME, whose nodes
#                          are reachable only there); Slurm commands must then run there too
# Prints `export SLURM_CONF=...`, `export KASCHED_CONFIG=...` and `export KASCHED_USER_BIN=...` (a
# directory with a `kasched` command ordinary users can run) on stdout. Stop with stop-slurm.sh.
set -euo pipefail
trap 'echo "start-slurm: failed at line $LINENO" >&2' ERR
root=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "start-slurm: run as root" >&2; exit 1; }
if [ -n "${KASCHED_SLURM_NETNS:-}" ] && [ "${KASCHED_SLURM_IN_NETNS:-}" != "$KASCHED_SLURM_NETNS" ]; then
    ip netns list | awk '{print $1}' | grep -qxF "$KASCHED_SLURM_NETNS" ||
        { echo "start-slurm: no network namespace $KASCHED_SLURM_NETNS (is the lab up?)" >&2; exit 1; }
    export KASCHED_SLURM_IN_NETNS=$KASCHED_SLURM_NETNS
    exec nsenter --net="/run/netns/$KASCHED_SLURM_NETNS" bash "$0" "$@"  # keeps the mounts (/sys/fs/cgroup)
fi
dir=${KASCHED_SLURM_DIR:-/var/lib/kasched-slurm}
nodes=${KASCHED_SLURM_NODES:-4}
timeout=${KASCHED_SLURMD_TIMEOUT:-300}
port=${KASCHED_SLURM_PORT:-16800}
user=${KASCHED_SLURM_USER:-kasched-slurm-user}
kasched=${KASCHED:-$root/.venv/bin/kasched}
prefix=${KASCHED_SLURM_NODE_PREFIX:-n}
standin_addr=${KASCHED_SLURM_STANDIN_ADDR:-127.0.0.2}
[ "$standin_addr" != none ] || standin_addr=
admins=kasched-slurm-admins
conf=$dir/slurm.conf

need() {  # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ||
        { echo "start-slurm: $1 missing: install Debian package $2 (scripts/setup.sh installs scripts/packages/slurm.txt)" >&2; exit 1; }
}
need munged munge
need slurmctld slurmctld
need slurmd slurmd
need sbatch slurm-client
compgen -G '/usr/lib/*/slurm-wlm/job_submit_lua.so' >/dev/null ||
    { echo "start-slurm: job_submit_lua.so missing: install Debian package slurm-wlm-basic-plugins" >&2; exit 1; }
[ -x "$kasched" ] || { echo "start-slurm: $kasched missing (run scripts/setup.sh)" >&2; exit 1; }

wait_for() {  # wait_for TRIES COMMAND...: retry every 0.2 s
    local tries=$1; shift
    for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
        touch "$dir/munged.started"
        wait_for 50 sh -c 'munge -n | unmunge' || { echo "start-slurm: munged did not start" >&2; exit 1; }
    fi
}

make_users() {
    getent group "$admins" >/dev/null || groupadd --system "$admins"
    usermod -a -G "$admins" slurm
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    # The hooks run as SlurmUser. Sites run them as slurm (a member of kasched's admin group); when this
    # checkout's Python is not reachable by slurm (a venv on a pyenv under /root), they run as root.
    if runuser -u slurm -- "$kasched" --version >/dev/null 2>&1; then
        slurm_user=slurm
    else
        slurm_user=root
    fi
    user_bin=$dir/bin  # a `kasched` ordinary users can run, for their deploy jobs
    mkdir -p "$user_bin"
    chmod 755 "$user_bin"
    if runuser -u "$user" -- "$kasched" --version >/dev/null 2>&1; then
        ln -sf "$kasched" "$user_bin/kasched"
    else  # the venv's Python is out of users' reach: Debian's python3 (same 3.11) on the venv's packages
        local site
        site=$("$(dirname "$kasched")/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        rm -f "$user_bin/kasched"
        printf '#!/bin/sh\nexec /usr/bin/python3 -c %s "$@"\n' \
            "'import site, sys; site.addsitedir(\"$site\"); from kasched.cli import main; sys.exit(main())'" \
            > "$user_bin/kasched"
        chmod 755 "$user_bin/kasched"
        runuser -u "$user" -- "$user_bin/kasched" --version >/dev/null 2>&1 ||
            { echo "start-slurm: $user cannot run kasched (neither $kasched nor /usr/bin/python3)" >&2; exit 1; }
    fi
}

make_site() {  # a kasched site for the hooks, unless the caller gave one
    if [ -n "${KASCHED_CONFIG:-}" ]; then return; fi
    KASCHED_CONFIG=$dir/kasched/kasched.yaml
    mkdir -p "$dir/kasched/state"
    # No real machines behind the nodes: nothing to revert at a job's end (the nodes are released at
    # once); scheduler_settings: what kasched's Slurm release reads where it runs (plugins/slurm/hold.py).
    printf 'site: slurm\nstate_dir: %s\nadmin_group: %s\nrevert_at_job_end: false\n' \
        "$dir/kasched/state" "$admins" > "$KASCHED_CONFIG"
    printf 'scheduler_settings:\n  KASCHED_SLURM_STATE_DIR: %s\n' "$dir/standin" >> "$KASCHED_CONFIG"
    local inventory=$dir/kasched/nodes.yaml
    printf 'site: slurm\nclusters:\n  - name: kasched\n    nodes:\n' > "$inventory"
    printf '      - name: %s[1-%s]\n        mac: "02:00:00:5e:00:[01-%02d]"\n        ip: 10.99.0.[1-%s]\n' \
        "$prefix" "$nodes" "$nodes" "$nodes" >> "$inventory"
    printf '        bmc: {driver: ssh}\n' >> "$inventory"
    chown -R "$slurm_user":"$admins" "$dir/kasched"
    chmod 755 "$dir/kasched"
    runuser -u "$slurm_user" -- env KASCHED_CONFIG="$KASCHED_CONFIG" "$kasched" nodes import "$inventory" >/dev/null
}

write_hooks() {  # slurmctld gives its hooks a bare environment: these wrappers complete it
    mkdir -p "$dir/hooks" "$dir/log" "$dir/standin"
    chown "$slurm_user" "$dir/log" "$dir/standin"
    local hook python
    python=$(dirname "$kasched")/python
    [ -x "$python" ] || python=python3
    for hook in prolog epilog; do
        cat > "$dir/hooks/$hook" <<EOF
#!/bin/sh
# Generated by scripts/start-slurm.sh: kasched's Slurm $hook (plugins/slurm/hooks.py) with its settings.
export KASCHED_CONFIG='$KASCHED_CONFIG' KASCHED='$kasched' SLURM_CONF='$conf'
export KASCHED_SLURM_STANDIN_ADDR='$standin_addr' KASCHED_SLURM_STATE_DIR='$dir/standin'
# One host runs the nodes' slurmds and their stand-ins: a stand-in gets a UTS namespace whose host name
# is its address, so that with NoInAddrAny it listens there (and %h keeps its files apart).
export KASCHED_SLURM_STANDIN_COMMAND="unshare --uts sh -c 'hostname {addr} && exec slurmd -D -N {node}'"
export PATH='$(dirname "$kasched")':/usr/sbin:/usr/bin:/sbin:/bin
start=\$(date +%s.%N)
{ echo "== $hook job \$SLURM_JOB_ID \$(date -u +%FT%T.%N)"; env | grep '^SLURM_' | sort; } >> '$dir/log/$hook-env.log'
'$python' -m kasched_slurm.hooks $hook >> '$dir/log/$hook.log' 2>&1
code=\$?
echo "job \$SLURM_JOB_ID $hook exit \$code \$(awk "BEGIN{printf \\"%.3f\\", \$(date +%s.%N) - \$start}") s" >> '$dir/log/hooks-time.log'
exit \$code
EOF
        chmod 755 "$dir/hooks/$hook"
    done
    # Node Epilog (slurmd runs it, as root, before the node leaves COMPLETING): the node of a deploy job,
    # answered by a stand-in, is drained at once (the hold EpilogSlurmctld also sets), so that Slurm
    # places no job on it in the moment before EpilogSlurmctld starts (measured before the hold: without
    # it, the next queued jobs got NODE_FAIL). kasched's release RESUMEs it once it is back.
    cat > "$dir/hooks/node-epilog" <<EOF
#!/bin/sh
# Generated by scripts/start-slurm.sh: keeps a deploy job's node out of scheduling until it is given back.
state='$dir/standin'
[ -e "\$state/job-\$SLURM_JOB_ID.json" ] || [ -e "\$state/job-\$SLURM_JOB_ID.releasing" ] || exit 0
SLURM_CONF='$conf' $(command -v scontrol) update NodeName="\$SLURMD_NODENAME" State=DRAIN Reason="kasched: giving back after job \$SLURM_JOB_ID" ||
    echo "kasched node epilog: could not drain \$SLURMD_NODENAME" >&2
exit 0
EOF
    chmod 755 "$dir/hooks/node-epilog"
}

write_conf() {
    local last=$((port + nodes))
    cat > "$conf.new" <<EOF
# Generated by kasched's scripts/start-slurm.sh
ClusterName=kasched
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmUser=$slurm_user
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdSpoolDir=$dir/slurmd/%n@%h
SlurmdPidFile=$dir/slurmd/%n@%h.pid
SlurmdLogFile=$dir/log/slurmd-%n@%h.log
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/linear
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=$timeout
InactiveLimit=0
KillWait=5
MinJobAge=600
MessageTimeout=5
PrologEpilogTimeout=120
JobSubmitPlugins=lua
PrologSlurmctld=$dir/hooks/prolog
EpilogSlurmctld=$dir/hooks/epilog
Epilog=$dir/hooks/node-epilog
NodeName=$prefix[1-$nodes] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((port + 1))-$last] CPUs=1 RealMemory=100 Feature=deploy State=UNKNOWN
PartitionName=main Nodes=$prefix[1-$nodes] Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -e "$conf" ] && ! cmp -s "$conf" "$conf.new" && scontrol ping 2>/dev/null | grep -q UP; then
        echo "start-slurm: slurm.conf changes: restarting the daemons" >&2
        bash "$root/scripts/stop-slurm.sh" >&2
    fi
    mv "$conf.new" "$conf"
    mkdir -p "$dir/ctld" "$dir/slurmd" "$dir/log"
    chown "$slurm_user" "$dir/ctld"
    cp "$root/plugins/slurm/job_submit.lua" "$dir/job_submit.lua"  # job_submit/lua reads it beside slurm.conf
}

start_daemons() {
    if ! scontrol ping 2>/dev/null | grep -q UP; then
        SLURM_CONF=$conf slurmctld -f "$conf"
        wait_for 100 sh -c "SLURM_CONF=$conf scontrol ping | grep -q UP" ||
            { tail -5 "$dir/log/slurmctld.log" >&2; echo "start-slurm: slurmctld did not start" >&2; exit 1; }
    fi
    local i pid
    for i in $(seq "$nodes"); do
        pid=$(cat "$dir/slurmd/$prefix$i@$(hostname -s).pid" 2>/dev/null || true)
        if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
            SLURM_CONF=$conf slurmd -f "$conf" -N "$prefix$i"
        fi
    done
    wait_for 150 sh -c "[ \$(SLURM_CONF=$conf sinfo -h -N -t idle,alloc,mix -o %N | wc -l) -ge $nodes ]" ||
        { SLURM_CONF=$conf sinfo -N >&2; echo "start-slurm: the nodes did not come up" >&2; exit 1; }
}

mkdir -p "$dir"
chmod 755 "$dir"
export SLURM_CONF=$conf
start_munge
make_users
write_conf  # first: a changed slurm.conf stops the daemons, which forgets the generated site
make_site
write_hooks
start_daemons
echo "export SLURM_CONF=$conf"
echo "export KASCHED_CONFIG=$KASCHED_CONFIG"
echo "export KASCHED_USER_BIN=$user_bin"
