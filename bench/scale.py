"""kasched's own cost at scale: deploy and revert of N simulated nodes (kasched/simulated) through a
real kaschedd process and the real CLI, on SQLite and PostgreSQL, with the prolog and epilog of an
N-node job.

Run: .venv/bin/python bench/scale.py [--quick] [--nodes N] [--db sqlite|postgresql|both] [--scale 1]
     [--image-gb 5] [--link-gbit 10] [--profile]

``--quick``: 1,000 nodes; default 10,000. The nodes first get a revert (they are not trusted yet:
power cycle, verify, boot), then a deploy (from the trusted reference) and a revert are measured.
Printed per database and operation:

* ``RATIO overhead = (wall - scale x P) / wall``: P is the physical critical path (the calibration's
  model, kasched/simulated/calibration.py, for the variants the nodes took, the slowest node's draw);
  at ``--scale 1`` (the default) the hardware's own pace;
* kaschedd's CPU seconds, and the CLI's; kaschedd's peak resident memory;
* database rows per node (all tables, after everything) and transactions per node (PostgreSQL);
* the live view's cost: one ``kasched deploy --status ID`` (kaschedd's CPU and the wall time);
* prolog and epilog wall time of an N-node job (``prolog/kasched-prolog``, ``epilog/kasched-epilog``
  with Slurm's environment); the epilog's revert runs after it, in the background, and is timed too.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from sqlalchemy import create_engine, inspect, text  # noqa: E402

from kasched.simulated.builder import populate, write_site  # noqa: E402
from kasched.simulated.calibration import PLANS, Calibration, critical_path  # noqa: E402

GB = 10**9


class Kaschedd:
    """kaschedd as a process of its own, on the site's configuration (optionally under cProfile)."""

    def __init__(self, config: Path, env: dict[str, str], profile: Path | None) -> None:
        self.config, self.env, self.profile = config, env, profile
        self.socket = config.parent / "state" / "kaschedd.sock"
        command = [sys.executable, "-m", "kasched.service.main", "--config", str(config)]
        if profile is not None:
            command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "kasched.service.main",
                       "--config", str(config)]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, stderr=open(config.parent / "kaschedd.log", "ab"))  # noqa: SIM115
        for _ in range(600):
            if self.socket.exists():
                return
            time.sleep(0.05)
        raise SystemExit("bench: kaschedd did not start (see kaschedd.log)")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.send_signal(2)  # SIGINT: cProfile writes its file
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run(command: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall time, the child's CPU time, the result."""
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), done


def used_variants(kind: str, outcomes: dict[str, Any]) -> dict[str, str]:
    """The variant most nodes took at each step they reached (from their fallbacks)."""
    used: dict[str, str] = {}
    for step, variants in PLANS[kind]:
        counts: Counter[str] = Counter()
        for outcome in outcomes.values():
            failed = {f.split(":")[0] for f in outcome.get("fallbacks", [])}
            reached = [s for s, _ in PLANS[kind]].index(outcome["step"]) >= [s for s, _ in PLANS[kind]].index(step)
            if reached:
                counts[next((v for v in variants if f"{step}/{v}" not in failed), variants[-1])] += 1
        if counts:
            used[step] = counts.most_common(1)[0][0]
    return used


def database_counts(url: str) -> tuple[int, int | None]:
    """Rows in every table; transactions so far (PostgreSQL's statistics; None on SQLite)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = sum(connection.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()
                       for t in inspect(connection).get_table_names())  # fmt: skip
            xacts = None
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_stat_clear_snapshot()"))
                xacts = connection.execute(text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
                )).scalar_one()  # fmt: skip
    finally:
        engine.dispose()
    return rows, xacts


class Bench:
    def __init__(self, base: Path, nodes: int, database: str, args: argparse.Namespace) -> None:
        self.nodes, self.args, self.database = nodes, args, database
        image = int(args.image_gb * GB)
        self.calibration = {"link_rate": args.link_gbit * 1e9}
        self.files = write_site(base, nodes, scale=args.scale, database=database, image_size=image,
                                calibration=self.calibration)  # fmt: skip
        started = time.perf_counter()
        config = populate(self.files)
        print(f"  site of {nodes} nodes populated in {time.perf_counter() - started:.1f} s")
        self.url = config.database
        self.image = image
        self.reference = 3 * (4 << 20)
        self.env = {**os.environ, "KASCHED_CONFIG": str(self.files.config_path),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}  # fmt: skip
        self.env.pop("KASCHED_DIRECT", None)
        self.all = f"node-[1-{nodes}]"

    def operation(self, kaschedd: Kaschedd, kind: str, scale: float) -> dict[str, Any]:
        self.files.update(scale=scale)
        command = [sys.executable, "-m", "kasched"]
        command += ["deploy", "-e", "userenv"] if kind == "deploy" else ["revert"]
        cpu, xacts = kaschedd.cpu(), database_counts(self.url)[1]
        wall, cli_cpu, done = run([*command, "-m", self.all, "--json"], self.env)
        if done.returncode not in (0, 2):
            raise SystemExit(f"bench: {kind} failed: {done.stderr[-2000:]}")
        data = json.loads(done.stdout)
        xacts_after = database_counts(self.url)[1]
        used = used_variants(kind, data["nodes"])
        path = critical_path(Calibration.default(1.0, self.calibration), kind, used, self.nodes, self.image,
                             self.reference)  # fmt: skip
        failed = sum(1 for o in data["nodes"].values() if o.get("error"))
        return {"wall": wall, "path": path, "scale": scale, "cpu": kaschedd.cpu() - cpu, "cli_cpu": cli_cpu,
                "used": used, "failed": failed, "id": data["id"],
                "xacts": None if xacts is None or xacts_after is None else xacts_after - xacts}  # fmt: skip

    def live_view(self, kaschedd: Kaschedd, deployment: str, polls: int = 5) -> tuple[float, float]:
        cpu, walls = kaschedd.cpu(), []
        for _ in range(polls):
            command = [sys.executable, "-m", "kasched", "deploy", "--status", deployment, "--json"]
            walls.append(run(command, self.env)[0])
        return sorted(walls)[len(walls) // 2], (kaschedd.cpu() - cpu) / polls

    def hooks(self, kaschedd: Kaschedd) -> tuple[float, float, float]:
        job = {**self.env, "SLURM_JOB_ID": "9001", "SLURM_JOB_USER": "root", "SLURM_JOB_NODELIST": self.all,
               "SLURM_CLUSTER_NAME": "sim", "SLURM_JOB_CONSTRAINTS": "deploy", "SLURM_JOB_EXIT_CODE": "0",
               "SLURM_JOB_NUM_NODES": str(self.nodes), "KASCHED": str(ROOT / ".venv" / "bin" / "kasched")}  # fmt: skip
        hook = {**job, "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld"}
        prolog, _, done = run([str(ROOT / "prolog" / "kasched-prolog")], hook)
        if done.returncode != 0:
            raise SystemExit(f"bench: prolog failed: {done.stderr[-1000:]}")
        self.operation(kaschedd, "deploy", self.args.scale)
        hook = {**job, "SLURM_SCRIPT_CONTEXT": "epilog_slurmctld"}
        epilog, _, done = run([str(ROOT / "epilog" / "kasched-epilog")], hook)
        if done.returncode != 0:
            raise SystemExit(f"bench: epilog failed: {done.stderr[-1000:]}")
        started = time.perf_counter()
        back = self._given_back(started + 3600)
        return prolog, epilog, back - started if back is not None else float("nan")

    def _given_back(self, deadline: float) -> float | None:
        engine = create_engine(self.url)
        try:
            while time.perf_counter() < deadline:
                with engine.connect() as connection:
                    query = text("SELECT count(*) FROM nodes WHERE state != 'reference'")
                    left = connection.execute(query).scalar_one()
                if left == 0:
                    return time.perf_counter()
                time.sleep(0.5)
        finally:
            engine.dispose()
        return None


def report(name: str, measured: dict[str, Any]) -> None:
    scaled = measured["scale"] * measured["path"]
    ratio = (measured["wall"] - scaled) / measured["wall"]
    xacts = f", {measured['xacts']} transactions" if measured["xacts"] is not None else ""
    print(f"  {name}: P = {measured['path']:.1f} s at the hardware's pace (variants {measured['used']}), "
          f"failed nodes {measured['failed']}")
    print(f"    scale {measured['scale']}: wall {measured['wall']:.2f} s against {scaled:.2f} s of P, kaschedd CPU "
          f"{measured['cpu']:.2f} s, CLI CPU {measured['cli_cpu']:.2f} s{xacts}")
    print(f"RATIO overhead = {ratio:.4f}  ({name}, scale {measured['scale']})")


def bench_database(base: Path, nodes: int, database: str, label: str, args: argparse.Namespace) -> None:
    print(f"# {label}: {nodes} simulated nodes, image {args.image_gb} GB, links {args.link_gbit} Gbit/s")
    bench = Bench(base, nodes, database, args)
    profile = base / "kaschedd.prof" if args.profile else None
    kaschedd = Kaschedd(bench.files.config_path, bench.env, profile)
    try:
        results: dict[str, dict[str, Any]] = {}
        warm = bench.operation(kaschedd, "revert", args.scale)  # every node verified and trusted
        report(f"{label} first revert (nodes not trusted yet)", warm)
        for kind in ("deploy", "revert"):
            results[kind] = bench.operation(kaschedd, kind, args.scale)
            report(f"{label} {kind}", results[kind])
        rows = database_counts(bench.url)[0]
        per_op = [r["xacts"] / nodes for r in results.values() if r["xacts"] is not None]
        xacts = f"; transactions per node per operation {min(per_op):.2f}-{max(per_op):.2f}" if per_op else ""
        print(f"  database: {rows / nodes:.1f} rows per node after 3 operations{xacts}")
        status_wall, status_cpu = bench.live_view(kaschedd, results["deploy"]["id"])
        print(f"  live view: one status of a {nodes}-node deploy {status_wall * 1000:.0f} ms wall, "
              f"kaschedd CPU {status_cpu * 1000:.0f} ms")  # fmt: skip
        prolog, epilog, back = bench.hooks(kaschedd)
        print(f"  {nodes}-node job: prolog {prolog * 1000:.0f} ms, epilog {epilog * 1000:.0f} ms "
              f"(its revert in the background: {back:.1f} s)")  # fmt: skip
        print(f"  kaschedd peak memory {kaschedd.peak_mib():.0f} MiB")
    finally:
        kaschedd.stop()
    if profile is not None and profile.exists():
        stats = pstats.Stats(str(profile))
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)


def postgresql() -> tuple[str, Any]:
    from bench.grants import postgresql_scratch

    done = subprocess.run(["bash", str(ROOT / "scripts/start-databases.sh"), "postgresql"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return postgresql_scratch(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 nodes (default 10,000)")
    parser.add_argument("--nodes", type=int, help="another node count")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--scale", type=float, default=1.0, help="time scale of the simulated hardware (default 1)")
    parser.add_argument("--image-gb", type=float, default=5.0, help="the image size the timings use (GB)")
    parser.add_argument("--link-gbit", type=float, default=10.0, help="the nodes' link rate (Gbit/s)")
    parser.add_argument("--profile", action="store_true", help="kaschedd under cProfile; print where time goes")
    args = parser.parse_args()
    nodes = args.nodes or (1_000 if args.quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="kasched-scale-") as directory:
        if args.db in ("sqlite", "both"):
            bench_database(Path(directory) / "sqlite", nodes, "", "sqlite", args)
        if args.db in ("postgresql", "both"):
            url, drop = postgresql()
            try:
                bench_database(Path(directory) / "postgresql", nodes, url, "postgresql", args)
            finally:
                drop()
    _ = cProfile  # the --profile run uses it through ``python -m cProfile``
    return 0


if __name__ == "__main__":
    sys.exit(main())
