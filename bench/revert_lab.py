"""The revert on the lab, side by side in one run at each node count: the trusted revert of intact
nodes, the fast path the revert had before (boot the reference partition by a soft reboot and believe
its command line), and the trusted revert of nodes whose whole reference partition was changed (the
image written again through the chain); then the reference partition's verify against the slower of
its two parts (bench/verify_rate.py).

    .venv/bin/python bench/revert_lab.py [--nodes 8,32] [--quick]

For each N a lab (``krev``, N namespace nodes on 2 switches, 1 Gbit/s links, real ipmi_sim BMCs,
dnsmasq, sshd) is built, kasched set up on it (the lab's reference partition as the site's raw
reference image, zstd), then, in this order, each timed from the command's start to its end:

1. ``kasched revert`` of every node: nodes not trusted yet (the lab booted them), partitions intact
   but for what their boot wrote (the ext4 superblock and journal): power cycle into the deployment
   system, verify, patch the few blocks, boot the reference;
2. ``kasched reboot --to reference``: the old revert's fast path (a soft reboot of a system kasched
   vouches for, its command line checked), on the same nodes;
3. every 4 MiB block of every node's reference partition changed from inside, then ``kasched revert``:
   more than half the blocks differ, so the whole image goes through the chain, then the verify.

Per N it prints the three times, the revert's per-step medians (its network boot, its verify) and
``RATIO trusted-over-budget = T1 / (T2 + setup + verify)``: the target is at most 1.0 (the trusted
revert costs no more than the fast path plus one network boot plus the verify). Then the verify on a
loop device (page cache dropped) against the device's raw read and the hash in memory, measured side
by side: ``RATIO verify``. Removes every lab at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
import verify_rate
import yaml
from labkit import KASCHED, LabRun, ratio_line

from kasched.lab.topology import LabPlan

LAB = "krev"
MIB = 1 << 20


def site_config(labrun: LabRun) -> Path:
    lab_dir = labrun.lab.state_dir
    config = labrun.work / "kasched.yaml"
    settings = {
        "site": "lab",
        "state_dir": str(labrun.work / "state"),
        "boot_dir": str(lab_dir / "boot"),
        "credentials_file": str(lab_dir / "credentials.yaml"),
        "service_key": str(lab_dir / "ssh" / "id_ed25519"),
        "reboot_timeout": 120.0,
    }
    config.write_text(yaml.safe_dump(settings))
    return config


def kasched(labrun: LabRun, config: Path, *args: str) -> tuple[float, dict[str, object]]:
    """A kasched command in the lab's namespace; (seconds, its --json answer)."""
    env = {**os.environ, "KASCHED_CONFIG": str(config), "KASCHED_DIRECT": "1"}
    started = time.monotonic()
    done = subprocess.run([*KASCHED, "lab", "exec", "--name", LAB, "--", *KASCHED, *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=3600)  # fmt: skip
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"kasched {' '.join(args)}: {done.stderr.strip()[-1500:]}")
    return took, json.loads(done.stdout) if done.stdout.strip() else {}


def register(labrun: LabRun, config: Path) -> None:
    """The lab's inventory, and its reference partition as the site's raw reference image."""
    golden = labrun.lab.state_dir / "systems" / "golden.img"
    partition = json.loads(labkit.run("sfdisk", "--json", str(golden)))["partitiontable"]["partitions"][1]
    raw = labrun.work / "reference.ext4"
    labkit.run("dd", f"if={golden}", f"of={raw}", "bs=512", f"skip={partition['start']}",
               f"count={partition['size']}", "status=none")  # fmt: skip
    labkit.run("zstd", "-q", "-f", "--rm", str(raw), "-o", f"{raw}.zst")
    (labrun.work / "reference.yaml").write_text(
        "name: reference\nvisibility: public\nreference: true\nimage: {file: reference.ext4.zst, kind: raw}\n"
    )
    env = {"KASCHED_CONFIG": str(config), "KASCHED_DIRECT": "1"}
    for args in (
        ["nodes", "import", str(labrun.lab.inventory_file)],
        ["env", "add", str(labrun.work / "reference.yaml")],
    ):
        labkit.run(*KASCHED, "lab", "exec", "--name", LAB, "--", *KASCHED, *args, env=env)


def change_every_block(labrun: LabRun) -> None:
    """From inside each node (the service's key): 4 KiB of random bytes at the start of every 4 MiB
    block of its reference partition."""
    script = (
        "size=$(blockdev --getsize64 /dev/sda2 2>/dev/null || echo $((96*1024*1024))); "
        "i=0; while [ $((i*4194304)) -lt $size ]; do "
        "dd if=/dev/urandom of=/dev/sda2 bs=4096 count=1 seek=$((i*1024)) conv=notrunc 2>/dev/null; "
        "i=$((i+1)); done; sync 2>/dev/null; true"  # the running system's own root: its sync may complain
    )
    for node in labrun.nodes:
        labkit.run(*labkit.in_lab(labrun, "ssh", *labkit.SSH_OPTIONS.split(), "-i", str(labrun.key),
                                  f"root@{node['ip']}", script))  # fmt: skip


def step_medians(answer: dict[str, object]) -> dict[str, float]:
    nodes = answer.get("nodes", {})
    assert isinstance(nodes, dict)
    steps: dict[str, list[float]] = {}
    for outcome in nodes.values():
        for step, seconds in outcome.get("durations", {}).items():
            steps.setdefault(step, []).append(seconds)
    return {step: statistics.median(values) for step, values in steps.items()}


def measure(count: int) -> dict[str, float]:
    plan = LabPlan(name=LAB, nodes=count, switches=2 if count > 1 else 1, link="1gbit", uplink="10gbit")
    with labkit.lab_up(plan, deploy=False) as labrun:
        config = site_config(labrun)
        register(labrun, config)
        everyone = f"node-[1-{count}]"
        trusted, answer = kasched(labrun, config, "revert", "-m", everyone)
        medians = step_medians(answer)
        fast, _ = kasched(labrun, config, "reboot", "--to", "reference", "-m", everyone)
        change_every_block(labrun)
        rewrite, rewritten = kasched(labrun, config, "revert", "-m", everyone)
        variants = {o["variant"] for o in rewritten["nodes"].values()}  # type: ignore[union-attr]
    return {"trusted": trusted, "fast": fast, "rewrite": rewrite, "setup": medians.get("setup", 0.0),
            "verify": medians.get("verify", 0.0), "boot": medians.get("boot", 0.0),
            "rewrite_variant": float("pxe" in variants)}  # fmt: skip


def verify_on_loop(size_mib: int) -> verify_rate.VerifyRates:
    threads = (os.cpu_count() or 1) + 2
    with tempfile.TemporaryDirectory(prefix="kasched-revert-", dir="/var/tmp") as work:
        image = Path(work) / "partition.img"
        blocks = verify_rate.random_image(image, size_mib * MIB)
        with verify_rate.loop_device(image) as device:
            return verify_rate.measure(device, blocks.size, threads, 3, blocks=blocks, say=verify_rate.say)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="8,32", help="node counts, comma-separated")
    parser.add_argument("--verify-size-mib", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="2 nodes, a 16 MiB verify")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (the lab)")
    counts = [2] if args.quick else [int(n) for n in args.nodes.split(",")]
    if args.quick:
        args.verify_size_mib = 16
    if any(n < 1 for n in counts) or args.verify_size_mib < 4:
        parser.error("--nodes must be positive counts, --verify-size-mib at least 4")
    print(f"{'N':>4} {'trusted':>9} {'fast path':>10} {'rewrite':>9} {'setup':>7} {'verify':>7} {'boot':>7}  budget")
    ratios = []
    for count in counts:
        row = measure(count)
        budget = row["fast"] + row["setup"] + row["verify"]
        ratios.append(row["trusted"] / budget)
        times = f"{row['trusted']:>8.1f}s {row['fast']:>9.1f}s {row['rewrite']:>8.1f}s"
        steps = f"{row['setup']:>6.1f}s {row['verify']:>6.1f}s {row['boot']:>6.1f}s"
        print(f"{count:>4} {times} {steps}  {budget:.1f}s", flush=True)
        print(ratio_line(f"trusted-over-budget N={count}", row["trusted"] / budget))
        print(ratio_line(f"rewrite-over-trusted N={count}", row["rewrite"] / row["trusted"]))
    rates = verify_on_loop(args.verify_size_mib)
    print("\n".join(rates.lines()))
    print(ratio_line("trusted-over-budget", max(ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
