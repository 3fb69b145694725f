"""A misbehaving client of kaschedd, run as an ordinary user with the system's Python (standard library
only): ``python3 rawclient.py MODE ...``. Prints one JSON document of what the server did.

- ``halfsent UNIX_SOCKET N WAIT``: opens N connections, each sending the start of a request and
  nothing more; for WAIT seconds, notes when the server closed each, and the status it answered.
- ``drip UNIX_SOCKET|HOST:PORT INTERVAL WAIT``: sends a request one byte every INTERVAL seconds and
  notes when the server cut it off (or when the whole request was sent)."""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

PARTIAL = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"


def connect(where: str) -> socket.socket:
    if where.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
        return sock
    host, _, port = where.rpartition(":")
    return socket.create_connection((host, int(port)))


def halfsent(where: str, count: int, wait: float) -> list[dict[str, object]]:
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    results: list[dict[str, object]] = []
    for index in range(count):
        try:
            sock = connect(where)
            sock.sendall(PARTIAL)
        except OSError as error:
            results.append({"closed_after": time.monotonic() - started, "status": None, "error": str(error)})
            continue
        sock.setblocking(False)
        result: dict[str, object] = {"closed_after": None, "status": None, "data": b""}
        results.append(result)
        selector.register(sock, selectors.EVENT_READ, (index, result))
    while selector.get_map() and time.monotonic() - started < wait:
        for key, _ in selector.select(timeout=0.2):
            _, result = key.data
            try:
                data = key.fileobj.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if data:
                result["data"] = result["data"] + data  # type: ignore[operator]
                continue
            result["closed_after"] = round(time.monotonic() - started, 2)
            selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
    for result in results:
        data = result.pop("data", b"") or b""
        first = data.split(b"\r\n", 1)[0].split()  # type: ignore[union-attr]
        result["status"] = int(first[1]) if len(first) > 1 and first[1].isdigit() else None
    return results


def drip(where: str, interval: float, wait: float) -> dict[str, object]:
    started = time.monotonic()
    sock = connect(where)
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    sent = 0
    for byte in request:
        if time.monotonic() - started > wait:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        sent += 1
        sock.settimeout(interval)
        try:
            if sock.recv(4096) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return {"cut_after": round(time.monotonic() - started, 2), "sent": sent, "of": len(request)}


def main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "halfsent":
        print(json.dumps(halfsent(argv[2], int(argv[3]), float(argv[4]))))
    elif mode == "drip":
        print(json.dumps(drip(argv[2], float(argv[3]), float(argv[4]))))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
