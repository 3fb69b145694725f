"""``kaschedd``: run the site service in the foreground (systemd runs it the same way)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kasched import config as config_module
from kasched.api import Kasched
from kasched.compose import open_site
from kasched.deploy import records
from kasched.errors import KaschedError
from kasched.identity import Caller
from kasched.service.server import ServiceApp, UnixHttpServer
from kasched.service.tcp import TcpHttpServer

log = logging.getLogger("kaschedd")


def serve(
    config: config_module.Config,
    socket_path: Path,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    api = open_site(config, Caller("root", is_admin=True))
    with api.database.session() as session:
        for deployment_id in records.recover_interrupted(session):
            log.warning(
                "operation %s was running when kaschedd stopped: marked interrupted, its nodes "
                "deploy_failed (to be reverted)",
                deployment_id,
            )
    app = ServiceApp(api)
    server = UnixHttpServer(socket_path, app)
    servers: list[Any] = [server]
    stop = stop or threading.Event()
    if config.reconcile_interval > 0:
        threading.Thread(target=reconcile_every, args=(api, config.reconcile_interval, stop), daemon=True).start()
    try:
        if config.service_tcp:
            tcp = TcpHttpServer(config, app)
            servers.append(tcp)
            threading.Thread(target=tcp.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
            log.info("listening on %s (%s)", tcp.url, "MUNGE credentials or signed tokens")
        watcher = threading.Thread(target=lambda: (stop.wait(), [s.shutdown() for s in servers]), daemon=True)
        watcher.start()
        if ready is not None:
            ready.set()
        server.serve_forever(poll_interval=0.2)
    finally:
        for each in servers:
            each.server_close()
        socket_path.unlink(missing_ok=True)
        api.close()


def reconcile_every(api: Kasched, interval: float, stop: threading.Event) -> None:
    """``kasched reconcile`` every ``interval`` seconds: grants whose epilog was lost are revoked and
    their nodes given back, without an admin's cron job."""
    from kasched.reconcile import reconcile

    while not stop.wait(interval):
        try:
            report = reconcile(api)
        except KaschedError as error:
            log.error("reconcile: %s", error)
            continue
        for grant, why in report.revoked:
            log.warning("reconcile: grant %d of %s (%s) revoked: %s", grant.id, grant.job, grant.user, why)
        for finding in report.power:
            done = "marked deploy_failed, given back" if finding.marked else "left as it is"
            log.warning("reconcile: %s recorded %s, its BMC: %s: %s", finding.node, finding.recorded, finding.bmc, done)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kaschedd", description="kasched's site service")
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket (default: service_socket of the config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        config = config_module.load(args.config)
        config_module.export_scheduler_settings(config)
        serve(config, Path(args.socket) if args.socket else config.service_socket, stop=stop)
    except KaschedError as error:
        print(f"kaschedd: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"kaschedd: error: {error.strerror}: {error.filename or ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
