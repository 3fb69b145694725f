#!/usr/bin/env bash
# The kasched demo on the embedded defaults (SQLite), as root: a site with a sample cluster and a
# sample environment; a deploy job of user "alice" gets a grant at its start and loses it at its end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
demo=$PWD/.demo
rm -rf "$demo" && mkdir -p "$demo/image/etc"
printf 'site: demo\nstate_dir: %s/state\n' "$demo" > "$demo/kasched.yaml"
export KASCHED_CONFIG=$demo/kasched.yaml PATH=$PWD/.venv/bin:$PATH
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

# A tiny root file system image, standing in for a real environment.
echo "built by the kasched demo" > "$demo/image/etc/motd"
tar -C "$demo/image" -czf "$demo/tiny.tar.gz" .
cat > "$demo/tiny.yaml" <<YAML
name: tiny
description: a tiny root file system (demo)
visibility: public
image: {file: tiny.tar.gz, kind: tar}
boot: {kernel: /vmlinuz, initrd: /initrd.img, cmdline: "console=ttyS0"}
YAML

step kasched config check
step kasched nodes import examples/cluster.yaml
step kasched nodes list
step kasched env add "$demo/tiny.yaml"
step kasched env list
echo; echo "# Slurm's PrologSlurmctld starts a deploy job of alice on node-[1-4]: the Slurm plugin makes a grant."
step env SLURM_JOB_ID=101 SLURM_JOB_USER=alice SLURM_JOB_NODELIST='node-[1-4]' SLURM_JOB_CONSTRAINTS=deploy \
    SLURM_CLUSTER_NAME=demo SLURM_SCRIPT_CONTEXT=prolog_slurmctld kasched job start
step kasched rights
step kasched rights check -u alice -m 'node-[1-4]'
step kasched rights check -u alice -m 'node-[4-5]' || true
echo; echo "# The job ends: EpilogSlurmctld revokes the grant."
step env SLURM_JOB_ID=101 SLURM_CLUSTER_NAME=demo SLURM_SCRIPT_CONTEXT=epilog_slurmctld SLURM_JOB_EXIT_CODE=0 \
    kasched job end
step kasched rights --all
step kasched rights check -u alice -m 'node-[1-4]' || true
step kasched stats --by node
echo; echo "demo: done (state in $demo)"
