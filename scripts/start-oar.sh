#!/usr/bin/env bash
# Bring up a one-host OAR 2.5 (Debian 12 packages) wired to kasched (idempotent; as root):
#   PostgreSQL (scripts/start-databases.sh) with OAR's own database "oar" and roles oar/oar_ro,
#   /etc/oar/oar.conf completed (the original kept as oar.conf.kasched-orig; stop-oar.sh puts it back),
#   fake resources node-1..N (deploy=YES; deploy jobs never contact their nodes) and the resource property
#   "kasched" (why kasched holds a resource while giving its node back), OAR's sshd on 6667
#   (deploy jobs run their command on DEPLOY_HOSTNAME=127.0.0.1 through it), Almighty,
#   OAR's REST API (oarapi.cgi behind plugins/oar/cgiserver.py, as oar, on 127.0.0.1:PORT),
#   kasched's OAR hooks (plugins/oar/hooks.py) as SERVER_PROLOGUE/EPILOGUE_EXEC_FILE, run by OAR as oar,
#   a kasched site (config, SQLite state, inventory of the nodes) unless KASCHED_CONFIG names one,
#   and an ordinary user to submit jobs (root and oar cannot).
# Settings (environment):
#   KASCHED_OAR_DIR     where everything lives (default /var/lib/kasched-oar)
#   KASCHED_OAR_NODES   number of nodes (default 4)
#   KASCHED_OAR_API_PORT  port of the REST API on 127.0.0.1 (default 6680)
#   KASCHED_OAR_USER    the ordinary user created for submitting (default kasched-oar-user)
#   KASCHED_CONFIG      kasched config the hooks use (default: a site generated under the dir)
#   KASCHED             the kasched command (default: .venv/bin/kasched of this checkout)
# Prints `export KASCHED_CONFIG=...` and `export KASCHED_OAR_API_URL=...`. Stop with stop-oar.sh.
set -euo pipefail
trap 'echo "start-oar: failed at line $LINENO" >&2' ERR
root=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "start-oar: run as root" >&2; exit 1; }
dir=${KASCHED_OAR_DIR:-/var/lib/kasched-oar}
nodes=${KASCHED_OAR_NODES:-4}
api_port=${KASCHED_OAR_API_PORT:-6680}
user=${KASCHED_OAR_USER:-kasched-oar-user}
kasched=${KASCHED:-$root/.venv/bin/kasched}
admins=kasched-oar-admins
conf=/etc/oar/oar.conf

need() {  # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ||
        { echo "start-oar: $1 missing: install Debian package $2 (scripts/setup.sh installs scripts/packages/oar.txt)" >&2; exit 1; }
}
need oar-server oar-server
need oarsub oar-user
need oarnodesetting oar-server
need /usr/lib/cgi-bin/oarapi/oarapi.cgi oar-restful-api
need pg_ctlcluster postgresql
need /usr/sbin/sshd openssh-server
[ -x "$kasched" ] || { echo "start-oar: $kasched missing (run scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$dir/log"

wait_for() {  # wait_for TRIES COMMAND...: retry every 0.2 s
    local tries=$1; shift
    for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
set_conf() {  # set_conf KEY VALUE: in oar.conf, replacing an earlier (or commented) line
    sed -i "/^#\?$1=/d" "$conf"
    echo "$1=\"$2\"" >> "$conf"
}

write_conf() {
    [ -e "$conf.kasched-orig" ] || cp -p "$conf" "$conf.kasched-orig"
    set_conf DB_BASE_PASSWD oar-kasched
    set_conf DB_BASE_PASSWD_RO oar-ro-kasched
    set_conf DB_HOSTNAME 127.0.0.1
    set_conf FINAUD_FREQUENCY 0                      # fake nodes: no liveness check (else Suspected)
    set_conf SCHEDULER_MIN_TIME_BETWEEN_2_CALLS 0
    set_conf SERVER_PROLOGUE_EXEC_FILE "$dir/hooks/prologue"
    set_conf SERVER_EPILOGUE_EXEC_FILE "$dir/hooks/epilogue"
    set_conf SERVER_PROLOGUE_EPILOGUE_TIMEOUT 60
    set_conf LOG_FILE "$dir/log/oar.log"
    touch "$dir/log/oar.log" && chown oar "$dir/log/oar.log"
}

start_database() {
    bash "$root/scripts/start-databases.sh" postgresql >/dev/null
    if ! su postgres -c "psql -qAtc \"SELECT 1 FROM pg_database WHERE datname='oar'\"" | grep -q 1; then
        oar-database --create --db-is-local -y >"$dir/log/oar-database.log" 2>&1 ||
            { tail -5 "$dir/log/oar-database.log" >&2; exit 1; }
    fi
}

add_resources() {  # node-1..N, one resource each, deploy=YES; Alive at once (FINAUD_FREQUENCY=0)
    local i known
    known=$(oarnodes -l 2>/dev/null || true)
    for i in $(seq "$nodes"); do
        grep -qx "node-$i" <<<"$known" || oarnodesetting -a -h "node-$i" -p deploy=YES >/dev/null
    done
}

add_hold_property() {  # the varchar resource property where kasched's epilogue writes why a node is held
    oarproperty -l | grep -qx kasched || oarproperty -a kasched -c >/dev/null
}

allow_env_type() {  # admission rule 16 lists the job types oarsub accepts: add env=NAME (kasched's environment)
    oaradmissionrules -s 16 -f -H > "$dir/rule-16.pl"
    grep -q 'qr/^env=' "$dir/rule-16.pl" && return
    sed -i 's|qr/^state=permissive$/,|qr/^state=permissive$/, qr/^env=[\\w.@:+-]+$/,|' "$dir/rule-16.pl"
    grep -q 'qr/^env=' "$dir/rule-16.pl" || { echo "start-oar: admission rule 16 is not the one OAR 2.5.9 ships" >&2; exit 1; }
    oaradmissionrules -m 16 -r "$dir/rule-16.pl" >/dev/null
}

make_users() {
    getent group "$admins" >/dev/null || groupadd --system "$admins"
    usermod -a -G "$admins" oar
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
}

hook_python() {  # a Python that user oar can run with kasched importable: the venv's, or a venv beside it
    local python
    python=$(dirname "$kasched")/python
    if runuser -u oar -- "$python" -c 'import kasched_oar.hooks' >/dev/null 2>&1; then
        echo "$python"; return
    fi
    # The checkout's venv lives on a Python oar cannot reach (e.g. pyenv under /root): a venv of the
    # system's Python of the same version, whose .pth adds the checkout venv's packages.
    local version site
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -x "/usr/bin/python$version" ] ||
        { echo "start-oar: user oar cannot run $python and /usr/bin/python$version is missing" >&2; exit 1; }
    [ -x "$dir/venv/bin/python" ] || "/usr/bin/python$version" -m venv --without-pip "$dir/venv" >/dev/null
    echo "import site; site.addsitedir('$site')" > "$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/kasched-checkout.pth"
    runuser -u oar -- "$dir/venv/bin/python" -c 'import kasched_oar.hooks' >/dev/null ||
        { echo "start-oar: user oar cannot import kasched with $dir/venv/bin/python" >&2; exit 1; }
    echo "$dir/venv/bin/python"
}

make_site() {  # a kasched site for the hooks, unless the caller gave one
    if [ -n "${KASCHED_CONFIG:-}" ]; then return; fi
    KASCHED_CONFIG=$dir/kasched/kasched.yaml
    mkdir -p "$dir/kasched/state"
    # Its nodes are names only (no machine answers): nothing to revert at a job's end; the nodes the
    # epilogue held are released at once (with a lab, KASCHED_CONFIG names the lab's site instead).
    printf 'site: oar\nstate_dir: %s\nadmin_group: %s\nrevert_at_job_end: false\n' "$dir/kasched/state" "$admins" > "$KASCHED_CONFIG"
    local inventory=$dir/kasched/nodes.yaml
    printf 'site: oar\nclusters:\n  - name: oar\n    nodes:\n' > "$inventory"
    printf '      - name: node-[1-%s]\n        mac: "02:00:00:5e:01:[01-%02d]"\n        ip: 10.98.0.[1-%s]\n' \
        "$nodes" "$nodes" "$nodes" >> "$inventory"
    printf '        bmc: {driver: ssh}\n' >> "$inventory"
    chown -R oar:"$admins" "$dir/kasched"
    chmod 755 "$dir/kasched"
    runuser -u oar -- env KASCHED_CONFIG="$KASCHED_CONFIG" "$python" -m kasched nodes import "$inventory" >/dev/null
}

write_hooks() {  # OAR runs its server hooks with Almighty's (bare) environment: the wrappers complete it
    mkdir -p "$dir/hooks"
    chown oar "$dir/log"
    local hook
    for hook in prologue epilogue; do
        cat > "$dir/hooks/$hook" <<HOOK
#!/bin/sh
# Generated by scripts/start-oar.sh: kasched's OAR server $hook (plugins/oar/hooks.py) with its settings.
export KASCHED_CONFIG='$KASCHED_CONFIG' KASCHED='$python -m kasched'
export KASCHED_OAR_API_URL='http://127.0.0.1:$api_port/oarapi' KASCHED_OAR_API_IDENT=oar KASCHED_OAR_CLUSTER=oar
export KASCHED_OAR_COMMAND_PREFIX=  # the hooks run beside OAR (the site's scheduler_settings are kaschedd's)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec '$python' -m kasched_oar.hooks $hook "\$@" >> '$dir/log/$hook.log' 2>&1
HOOK
        chmod 755 "$dir/hooks/$hook"
    done
}

start_sshd() {  # OAR's own sshd: deploy jobs run their command on DEPLOY_HOSTNAME through it
    [ -s "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null && return
    mkdir -p /run/sshd
    /usr/sbin/sshd -f /etc/oar/sshd_config -o ListenAddress=127.0.0.1 -o PidFile="$dir/sshd.pid"
    wait_for 50 test -s "$dir/sshd.pid"
}

start_almighty() {
    if [ -s /var/run/oar-server.pid ] && kill -0 "$(cat /var/run/oar-server.pid)" 2>/dev/null; then return; fi
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /usr/sbin/oar-server
    wait_for 50 sh -c 'oarnotify -l | grep -q default'
}

start_api() {
    if [ -s "$dir/api.pid" ] && kill -0 "$(cat "$dir/api.pid")" 2>/dev/null; then return; fi
    (setsid runuser -u oar -- /usr/bin/python3 "$root/plugins/oar/cgiserver.py" --host 127.0.0.1 \
        --port "$api_port" --read-only >>"$dir/log/api.log" 2>&1 & echo $! > "$dir/api.pid")
    wait_for 100 python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$api_port/oarapi/resources.json', timeout=5)" ||
        { tail -5 "$dir/log/api.log" >&2; echo "start-oar: OAR API did not answer" >&2; exit 1; }
}

write_conf
start_database
make_users
python=$(hook_python)
make_site
write_hooks
start_sshd
start_almighty
add_resources
add_hold_property
allow_env_type
start_api
echo "export KASCHED_CONFIG=$KASCHED_CONFIG"
echo "export KASCHED_OAR_API_URL=http://127.0.0.1:$api_port/oarapi"
