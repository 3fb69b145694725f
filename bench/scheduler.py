"""Scheduler hooks: prolog and epilog wall time for 1, 100 and 1,000-node jobs, and many deploy jobs
submitted at once on a real Slurm with no prolog failure.

Run: .venv/bin/python bench/scheduler.py [--runs N] [--jobs 200] [--slurm-nodes 8] [--quick]

Part 1 runs the real entry points (``prolog/kasched-prolog``, ``epilog/kasched-epilog``), as processes,
with the environment slurmctld gives them, on a SQLite site holding 1,000 nodes. It prints the median
and worst wall time per job size, the ratio to a 1-node job, and the cost of starting the ``kasched``
command alone (``kasched --version``) measured in the same run: most of a hook's time is Python
starting. Part 2 starts the real slurmctld and slurmds (tests/schedulers/slurm_cluster.py), submits
``--jobs`` deploy jobs at once as an ordinary user, and counts grants created and revoked, prolog
failures and jobs not COMPLETED.

One run (2026-11-21, 2 cores, load average 2-15 from other work), ``--runs 5 --jobs 200 --slurm-nodes 8``:

    kasched --version (Python start-up alone): median 681 ms
     nodes  prolog p50     max  epilog p50     max  prolog/1-node
         1      1019ms  1160ms       935ms  1015ms          1.00x
       100       843ms  1081ms      1024ms  1978ms          0.83x
      1000       867ms   997ms       928ms   952ms          0.85x
    ratio: 1,000-node prolog / start-up alone = 1.27x
    200 deploy jobs on 8 nodes: submitted in 2.5 s; all ended in 498.5 s (2.49 s per job)
    grants created 200/200, revoked 200/200; prolog failures 0; jobs not COMPLETED: 0

The hooks' time is Python starting; the node count barely shows. An earlier run at load average 30
(other labs running) failed 44 of 200 prologs: stand-ins took longer than their 15 s to start (now 45 s),
and 4 of 10 queued jobs ended NODE_FAIL before the node Epilog drained deploy nodes (now 0).
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

ROOT = Path(__file__).resolve().parent.parent
KASCHED = ROOT / ".venv" / "bin" / "kasched"
SIZES = (1, 100, 1_000)


def make_site(directory: Path, nodes: int) -> dict[str, str]:
    """A SQLite site with ``nodes`` nodes, and the environment the hooks run with."""
    config = directory / "kasched.yaml"
    # revert_at_job_end off: the epilog would start a background revert of nodes that do not exist,
    # whose CPU would slow the runs that follow; the epilog's own work (the revoke) is what is timed.
    config.write_text(f"site: bench\nstate_dir: {directory / 'state'}\nrevert_at_job_end: false\n")
    inventory = directory / "nodes.yaml"
    entries = "".join(
        f"      - {{name: n{i}, mac: '02:00:00:00:{i >> 8:02x}:{i & 255:02x}', ip: 10.0.{i >> 8}.{i & 255}, "
        "bmc: {driver: ssh}}\n"
        for i in range(1, nodes + 1)
    )
    inventory.write_text(f"site: bench\nclusters:\n  - name: bench\n    nodes:\n{entries}")
    env = {"PATH": f"{KASCHED.parent}:/usr/bin:/bin", "KASCHED_CONFIG": str(config), "KASCHED": str(KASCHED)}
    done = subprocess.run([str(KASCHED), "nodes", "import", str(inventory)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench: inventory import failed: {done.stderr.strip()}")
    return env


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench: {command[0]} failed: {(done.stdout + done.stderr).strip()[-300:]}")
    return elapsed


def hook_times(env: dict[str, str], size: int, runs: int, first_job: int) -> tuple[list[float], list[float]]:
    prologs, epilogs = [], []
    nodes = f"n[1-{size}]" if size > 1 else "n1"
    for run in range(runs):
        job = {
            **env,
            "SLURM_JOB_ID": str(first_job + run),
            "SLURM_JOB_USER": "alice",
            "SLURM_JOB_NODELIST": nodes,
            "SLURM_CLUSTER_NAME": "bench",
            "SLURM_JOB_CONSTRAINTS": "deploy",
            "SLURM_JOB_EXIT_CODE": "0",
        }
        for times, hook in ((prologs, "prolog"), (epilogs, "epilog")):
            script = str(ROOT / hook / f"kasched-{hook}")
            times.append(timed([script], {**job, "SLURM_SCRIPT_CONTEXT": f"{hook}_slurmctld"}))
    return prologs, epilogs


def part_hooks(runs: int, sizes: tuple[int, ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="kasched-bench-") as directory:
        env = make_site(Path(directory), max(sizes))
        startup = [timed([str(KASCHED), "--version"], env) for _ in range(runs)]
        base = statistics.median(startup)
        print(f"# hooks: {runs} runs each, SQLite, {max(sizes)} nodes in the inventory")
        print(f"kasched --version (Python start-up alone): median {base * 1000:.0f} ms")
        print(f"{'nodes':>6} {'prolog p50':>11} {'max':>7} {'epilog p50':>11} {'max':>7} {'prolog/1-node':>14}")
        reference = None
        for index, size in enumerate(sizes):
            prologs, epilogs = hook_times(env, size, runs, 1000 * (index + 1))
            median = statistics.median(prologs)
            reference = reference or median
            epilog = statistics.median(epilogs)
            print(
                f"{size:>6} {median * 1000:>9.0f}ms {max(prologs) * 1000:>5.0f}ms "
                f"{epilog * 1000:>9.0f}ms {max(epilogs) * 1000:>5.0f}ms {median / reference:>13.2f}x"
            )
        print(f"ratio: {max(sizes):,}-node prolog / start-up alone = {median / base:.2f}x")


def part_slurm(jobs: int, slurm_nodes: int) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "schedulers"))
    from slurm_cluster import USER, slurm_cluster  # the test suite's real Slurm (munge, slurmctld, slurmds)

    print(f"\n# real Slurm 22.05: {jobs} deploy jobs submitted at once on {slurm_nodes} nodes")
    with slurm_cluster(port=16950, nodes=slurm_nodes) as slurm:
        started = time.monotonic()
        ids = []
        for _ in range(jobs):
            done = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "-C", "deploy", "-N", "1", "-t", "5",
                             "--wrap", "true", user=USER)  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"bench: sbatch failed: {done.stderr.strip()}")
            ids.append(done.stdout.strip().split(";")[0])
        submitted = time.monotonic() - started
        states = wait_all_ended(slurm, ids, timeout=60 + 3 * jobs)
        took = time.monotonic() - started
        grants = json.loads(slurm.kasched("rights", "--all", "--json", "-u", USER).stdout)
        mine = [g for g in grants if g["job_id"] in set(ids)]
        revoked = [g for g in mine if g["revoked_at"]]
        failures = slurm.log("prolog.log").count("failed")
        not_completed = {i: s for i, s in states.items() if s != "COMPLETED"}
        print(f"submitted in {submitted:.1f} s; all ended in {took:.1f} s ({took / jobs:.2f} s per job)")
        print(f"grants created {len(mine)}/{jobs}, revoked {len(revoked)}/{jobs}; prolog failures {failures}")
        print(f"jobs not COMPLETED: {len(not_completed)} {dict(list(not_completed.items())[:5])}")
        print_hook_times(slurm.log("hooks-time.log"))


def print_hook_times(log: str) -> None:
    """The wall time of each PrologSlurmctld / EpilogSlurmctld run (the wrapper's hooks-time.log lines:
    ``job ID prolog exit CODE SECONDS s``): what a job waits for kasched on real Slurm."""
    times: dict[str, list[float]] = {"prolog": [], "epilog": []}
    for line in log.splitlines():
        words = line.split()
        if len(words) == 7 and words[2] in times:
            times[words[2]].append(float(words[5]))
    for hook, values in times.items():
        if values:
            print(
                f"{hook} on real Slurm: {len(values)} runs, p50 {statistics.median(values) * 1000:.0f} ms, "
                f"max {max(values) * 1000:.0f} ms"
            )


def wait_all_ended(slurm: object, ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        done = slurm.run("squeue", "-h", "-t", "all", "-o", "%i %T")  # type: ignore[attr-defined]
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        if all(states.get(i) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for i in ids):
            return {i: states[i] for i in ids}
        time.sleep(1)
    return {i: states.get(i, "unknown") for i in ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--slurm-nodes", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 and 100 nodes, 10 jobs on 4 nodes")
    parser.add_argument("--no-slurm", action="store_true", help="only the hook timings")
    parser.add_argument("--sizes", help="job sizes for the hook timings (default 1,100,1000)")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.no_slurm:
        sys.exit("bench: the Slurm part runs slurmctld and slurmds: run as root, or pass --no-slurm")
    if args.quick:
        args.runs, args.jobs, args.slurm_nodes = 3, 10, 4
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else SIZES[:2] if args.quick else SIZES
    part_hooks(args.runs, sizes)
    if not args.no_slurm:
        part_slurm(args.jobs, args.slurm_nodes)


if __name__ == "__main__":
    main()
