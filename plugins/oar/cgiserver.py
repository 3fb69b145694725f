"""A small CGI server for OAR's REST API (``oarapi.cgi``) on loopback, standard library only.

Debian 12's OAR 2.5 packages an Apache recipe that needs a FastCGI module Debian 12 lacks; the CGI
itself works behind any CGI-capable server. This one serves ``/oarapi/...`` by running the CGI once
per request, as the user it runs as (start it as ``oar``), and passes the ``X-Remote-Ident`` header
(the caller's OAR identity, which the CGI trusts) as ``HTTP_X_REMOTE_IDENT``. It only binds loopback
addresses: whoever can reach it may claim any identity, so on a shared host allow only GET
(``--read-only``, what kasched needs) or put an authenticating server in front.

    python3 cgiserver.py [--host 127.0.0.1] [--port 6680] [--read-only] [--cgi /usr/lib/cgi-bin/oarapi/oarapi.cgi]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CGI = "/usr/lib/cgi-bin/oarapi/oarapi.cgi"
PREFIX = "/oarapi"
CGI_TIMEOUT = 30.0


class OarApiHandler(BaseHTTPRequestHandler):
    server_version = "kasched-oarapi/1"
    cgi = CGI
    read_only = False

    def do_GET(self) -> None:
        self.run_cgi()

    def do_POST(self) -> None:
        self.refuse_or_run()

    def do_DELETE(self) -> None:
        self.refuse_or_run()

    def refuse_or_run(self) -> None:
        if self.read_only:
            self.send_error(405, "read-only OAR API: only GET")
            return
        self.run_cgi()

    def run_cgi(self) -> None:
        url = urlsplit(self.path)
        if url.path != PREFIX and not url.path.startswith(PREFIX + "/"):
            self.send_error(404, f"only {PREFIX}/...")
            return
        declared = self.headers.get("Content-Length") or "0"
        length = int(declared) if declared.isascii() and declared.isdigit() else 0
        body = self.rfile.read(length) if length else b""
        env = self.cgi_environ(url.path[len(PREFIX) :], url.query, length)
        try:
            done = subprocess.run([self.cgi], input=body, env=env, capture_output=True, timeout=CGI_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as error:
            self.send_error(502, f"oarapi.cgi: {error}")
            return
        self.relay(done.stdout)

    def cgi_environ(self, path_info: str, query: str, length: int) -> dict[str, str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": self.server_version,
            "SERVER_NAME": self.server.server_address[0],  # type: ignore[index]
            "SERVER_PORT": str(self.server.server_address[1]),  # type: ignore[index]
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": PREFIX,
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "REQUEST_URI": self.path,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_LENGTH": str(length) if length else "",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "HTTP_ACCEPT": self.headers.get("Accept", ""),
            "HTTP_HOST": self.headers.get("Host", ""),
        }
        ident = self.headers.get("X-Remote-Ident")
        if ident:
            env["HTTP_X_REMOTE_IDENT"] = ident
        return env

    def relay(self, output: bytes) -> None:
        head, _, body = output.replace(b"\r\n", b"\n").partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                code = value.strip().split(" ", 1)[0]
                status = int(code) if code.isdigit() else 502
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OAR's REST API CGI on a loopback address")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6680)
    parser.add_argument("--cgi", default=CGI)
    parser.add_argument("--read-only", action="store_true", help="refuse everything but GET")
    args = parser.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"cgiserver: {args.host} is not a loopback address (the CGI trusts X-Remote-Ident)", file=sys.stderr)
        return 2
    if not os.access(args.cgi, os.X_OK):
        print(f"cgiserver: {args.cgi} missing (Debian package oar-restful-api)", file=sys.stderr)
        return 2
    OarApiHandler.cgi, OarApiHandler.read_only = args.cgi, args.read_only
    server = ThreadingHTTPServer((args.host, args.port), OarApiHandler)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
