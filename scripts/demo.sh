#!/usr/bin/env bash
# The kasched demo, as root, on the embedded defaults (SQLite), a lab and a real Slurm 22.05:
#   a lab of 4 virtual nodes on 2 switches (real BMCs over IPMI, DHCP/TFTP, sshd), kaschedd, and a Slurm
#   cluster whose nodes are the lab's (node-1..node-4, its PrologSlurmctld/EpilogSlurmctld are kasched's);
#   an ordinary user submits a deploy job (salloc -C deploy), deploys an environment inside it
#   (kasched deploy, no node list), works on the nodes over ssh; the job ends: the epilog revokes the grant
#   and the nodes go back to the reference environment by themselves, and are idle in Slurm again.
# Everything runs inside the lab's network namespace kl-demo (the lab has no route out). At the end the
# lab is down and Slurm stopped; `bash scripts/demo.sh --keep` leaves them up (the end says how to stop).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=${1:-}
bash scripts/setup.sh
export PATH=$PWD/.venv/bin:$PATH
demo=$PWD/.demo
lab=/var/lib/kasched-lab/demo
netns=kl-demo
user=kasched-slurm-user
export KASCHED_SLURM_DIR=$demo/slurm KASCHED_SLURM_NETNS=$netns
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n# %s\n' "$*"; }
inlab() { nsenter --net=/run/netns/$netns "$@"; }  # the lab's service host: its nodes are reachable here
asuser() {  # a command of the ordinary user, on the lab's service host (the login node)
    inlab runuser -u "$user" -- env HOME="$demo/user" PATH="$KASCHED_USER_BIN:/usr/bin:/bin" \
        SLURM_CONF="$SLURM_CONF" KASCHED_CONFIG="$KASCHED_CONFIG" "$@"
}
stop_all() {
    [ -z "$(cat "$demo/kaschedd.pid" 2>/dev/null)" ] || kill "$(cat "$demo/kaschedd.pid")" 2>/dev/null || true
    rm -f "$demo/kaschedd.pid"
    bash scripts/stop-slurm.sh
    kasched lab down --name demo >/dev/null
}

stop_all 2>/dev/null || true
rm -rf "$demo" && mkdir -p "$demo/user" && chmod 755 "$demo"
[ "$keep" = --keep ] || trap 'stop_all; echo "demo: the lab is down and Slurm stopped"' EXIT
step kasched lab up --name demo --nodes 4 --switches 2 --link 1gbit
export KASCHED_CONFIG=$lab/kasched.yaml

# Two environments: a user environment (the lab's small Debian-built system; /etc/kasched-system says
# userenv), and the site's reference environment (the image of the nodes' reference partition).
kasched lab make-env --name demo "$demo/userenv.tgz" >/dev/null
printf 'name: userenv\ndescription: a small system built from Debian packages (demo)\nvisibility: public\nimage: {file: userenv.tgz, kind: tar}\n' \
    > "$demo/userenv.yaml"
read -r start size < <(sfdisk --json "$lab/systems/golden.img" |
    python3 -c 'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"][1]; print(p["start"], p["size"])')
dd if="$lab/systems/golden.img" of="$demo/reference.ext4" bs=512 skip="$start" count="$size" status=none
zstd -q -f --rm "$demo/reference.ext4" -o "$demo/reference.ext4.zst"
printf "name: reference\ndescription: the site's reference environment\nvisibility: public\nreference: true\nimage: {file: reference.ext4.zst, kind: raw}\n" \
    > "$demo/reference.yaml"

say "The site: the lab's nodes and the two environments, then kaschedd (users deploy through it)."
step inlab kasched nodes import "$lab/inventory.yaml"
step inlab kasched env add "$demo/userenv.yaml"
step inlab kasched env add "$demo/reference.yaml"
# kaschedd puts the nodes a job's end held (drained) back into service once reverted (docs/slurm.md): it
# needs the hooks' state dir (scheduler_settings) and Slurm's configuration (start-slurm.sh writes it there).
printf 'scheduler_settings:\n  KASCHED_SLURM_STATE_DIR: %s\n' "$KASCHED_SLURM_DIR/standin" >> "$KASCHED_CONFIG"
SLURM_CONF=$KASCHED_SLURM_DIR/slurm.conf inlab kaschedd --config "$KASCHED_CONFIG" >"$demo/kaschedd.log" 2>&1 &
echo $! > "$demo/kaschedd.pid"
for _ in $(seq 100); do inlab kasched env list >/dev/null 2>&1 && break; sleep 0.2; done

say "Slurm: slurmctld and the nodes' slurmds in the lab's namespace, kasched's hooks (scripts/start-slurm.sh)."
eval "$(KASCHED_SLURM_NODE_PREFIX=node- bash scripts/start-slurm.sh)"
step inlab sinfo -N

say "The user $user: an SSH key, and an ssh config naming the nodes."
chown "$user" "$demo/user"
runuser -u "$user" -- ssh-keygen -q -t ed25519 -N "" -C "$user@demo" -f "$demo/user/key"
python3 - "$lab/inventory.yaml" "$demo/user" > "$demo/user/ssh_config" <<'EOF'
import sys, yaml
for node in yaml.safe_load(open(sys.argv[1]))["clusters"][0]["nodes"]:
    print(f"Host {node['name']}\n  HostName {node['ip']}\n  User root\n  IdentityFile {sys.argv[2]}/key")
print("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR")
EOF
cat > "$demo/user/job.sh" <<'EOF'
#!/bin/sh
set -e
cd "$HOME"
echo "== job $SLURM_JOB_ID of $(id -un) on $SLURM_JOB_NODELIST"
kasched rights
kasched deploy -e userenv -k key.pub
for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    ssh -F ssh_config "$node" 'echo "$(hostname): $(cat /etc/kasched-system) system, root on $(cat /run/kasched/cmdline)"'
done
EOF
chmod 755 "$demo/user/job.sh"
step cat "$demo/user/job.sh"

say "The user submits a deploy job: salloc -C deploy -N 2. Its command runs job.sh above."
step asuser salloc -C deploy -N 2 -t 10 --comment env=userenv "$demo/user/job.sh"

say "The job has ended: EpilogSlurmctld revokes the grant and returns at once; the nodes go back to the
# reference environment in the background ('kasched job reclaim', its log in the state directory)."
for _ in $(seq 120); do
    inlab kasched rights --all --json |
        python3 -c 'import json,sys; sys.exit(0 if all(g["revoked_at"] for g in json.load(sys.stdin)) else 1)' && break
    sleep 0.5
done
step inlab kasched rights --all
for _ in $(seq 180); do
    [ "$(inlab kasched nodes list --state reference --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 4 ] && break
    sleep 1
done
step cat "$lab"/kasched/reclaim/grant-1.log
step inlab kasched nodes list
step inlab ssh -F "$demo/user/ssh_config" -i "$lab/ssh/id_ed25519" node-1 \
    'echo "$(hostname): $(cat /etc/kasched-system) system, root on $(cat /run/kasched/cmdline)"'
for _ in $(seq 60); do [ "$(inlab sinfo -h -t idle -o %D)" = 4 ] && break; sleep 1; done
step inlab sinfo -N
step cat "$KASCHED_SLURM_DIR/log/hooks-time.log"
if [ "$keep" = --keep ]; then
    echo; echo "demo: done; the lab and Slurm are up. Stop them: kill $(cat "$demo/kaschedd.pid");"
    echo "  KASCHED_SLURM_DIR=$demo/slurm KASCHED_SLURM_NETNS=$netns bash scripts/stop-slurm.sh; kasched lab down --name demo"
else
    echo; echo "demo: done"
fi
