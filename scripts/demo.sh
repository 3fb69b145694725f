#!/usr/bin/env bash
# The kasched demo, as root, on the embedded defaults (SQLite) and the lab: 4 virtual nodes on 2
# switches with real BMCs (IPMI), DHCP/TFTP and sshd. A Slurm prolog gives alice a grant; an
# environment is deployed on the nodes and checked from inside; the epilog revokes the grant and the
# nodes go back to the reference environment. The lab stays up afterwards: `kasched lab down --name demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH=$PWD/.venv/bin:$PATH
demo=$PWD/.demo
lab=/var/lib/kasched-lab/demo
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
inlab() { kasched lab exec --name demo -- "$@"; }

kasched lab down --name demo >/dev/null
rm -rf "$demo" && mkdir -p "$demo"
step kasched lab up --name demo --nodes 4 --switches 2 --link 1gbit
export KASCHED_CONFIG=$lab/kasched.yaml

# Two environments: a user environment (the lab's small Debian-built system, with a marker), and
# the site's reference environment (the image of the nodes' reference partition).
kasched lab make-env --name demo "$demo/userenv.tgz" >/dev/null
cat > "$demo/userenv.yaml" <<YAML
name: userenv
description: a small system built from Debian packages (demo)
visibility: public
image: {file: userenv.tgz, kind: tar}
YAML
read -r start size < <(sfdisk --json "$lab/systems/golden.img" |
    python3 -c 'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"][1]; print(p["start"], p["size"])')
dd if="$lab/systems/golden.img" of="$demo/reference.ext4" bs=512 skip="$start" count="$size" status=none
zstd -q -f --rm "$demo/reference.ext4" -o "$demo/reference.ext4.zst"
cat > "$demo/reference.yaml" <<YAML
name: reference
description: the site's reference environment
visibility: public
reference: true
image: {file: reference.ext4.zst, kind: raw}
YAML
ssh-keygen -q -t ed25519 -N "" -C alice@demo -f "$demo/alice"

step inlab kasched nodes import "$lab/inventory.yaml"
step inlab kasched env add "$demo/userenv.yaml"
step inlab kasched env add "$demo/reference.yaml"
step inlab kasched env list
echo; echo "# Slurm's PrologSlurmctld starts a deploy job of alice on node-[1-4]: kasched grants the nodes."
step inlab env SLURM_JOB_ID=101 SLURM_JOB_USER=alice SLURM_JOB_NODELIST='node-[1-4]' \
    SLURM_JOB_CONSTRAINTS=deploy SLURM_CLUSTER_NAME=demo SLURM_SCRIPT_CONTEXT=prolog_slurmctld kasched job start
step inlab kasched rights check -u alice -m 'node-[1-4]'
echo; echo "# Deploy the environment on the job's nodes (with alice's key), then look inside node-1."
step inlab kasched deploy -e userenv -m 'node-[1-4]' -k "$demo/alice.pub"
ip=$(python3 -c "import yaml; print(yaml.safe_load(open('$lab/inventory.yaml'))['clusters'][0]['nodes'][0]['ip'])")
step inlab ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i "$demo/alice" \
    "root@$ip" 'echo "$(hostname): $(cat /etc/kasched-system) system, root on $(cat /run/kasched/cmdline)"'
echo; echo "# The job ends: EpilogSlurmctld revokes the grant and returns at once; the nodes go back to the"
echo "# reference environment in the background ('kasched job reclaim', its log in the state directory)."
step inlab env SLURM_JOB_ID=101 SLURM_CLUSTER_NAME=demo SLURM_SCRIPT_CONTEXT=epilog_slurmctld \
    SLURM_JOB_EXIT_CODE=0 kasched job end
step inlab kasched nodes list
for _ in $(seq 180); do
    [ "$(inlab kasched nodes list --state reference --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 4 ] && break
    sleep 1
done
step cat "$lab"/kasched/reclaim/grant-1.log
step inlab kasched nodes list
step inlab kasched stats --by step
echo; echo "demo: done. The lab is still up: kasched lab status --name demo; kasched lab down --name demo"
