"""Cloudlet's test application: a stdlib HTTP/1.1 server with knobs for integration tests.

Endpoints:
  GET  /                 hello from $K_REVISION
  GET  /sleep?ms=N       sleep N ms, then "slept N"
  GET  /stats            {"in_flight", "peak", "requests", "pid", "revision"}
  GET  /stats/reset      reset peak and requests, return the stats
  GET  /env              os.environ as JSON
  ANY  /headers          request headers as JSON (+ "_method", "_path")
  POST /echo             stream the request body back (chunked)
  POST /count            {"bytes": n, "sha256": hex} of the request body
  GET  /bytes?n=N        N bytes where byte i == i % 256 (&chunked=1 for chunked encoding)
  GET  /exit?code=N      answer, then os._exit(N) shortly after
  GET  /status?code=N    answer with status N
  GET  /alloc?mb=N       allocate and hold N more MiB (to exceed a memory limit)
  GET  /file?path=P      the file's bytes (404 if missing); &write=1 tries to append to it
                         instead: 200 "written", or 409 {"errno", "error"} if refused
Env: PORT (8080), STARTUP_DELAY_MS, CRASH_AT_START, SIGTERM_DELAY_MS.
/stats and /stats/reset are not counted in in_flight, peak or requests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)  # byte i of every stream is i % 256
REVISION = os.environ.get("K_REVISION", "unknown")

_out_lock = threading.Lock()


def log(severity: str, message: str) -> None:
    line = json.dumps({"severity": severity, "message": message}, separators=(",", ":"))
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Stats:
    """Thread-safe request counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0  # counted requests (not /stats)
        self.active = 0  # every request, for the SIGTERM drain
        self.peak = 0
        self.requests = 0

    def enter(self, counted: bool) -> None:
        with self.lock:
            self.active += 1
            if counted:
                self.in_flight += 1
                self.requests += 1
                self.peak = max(self.peak, self.in_flight)

    def leave(self, counted: bool) -> None:
        with self.lock:
            self.active -= 1
            if counted:
                self.in_flight -= 1

    def snapshot(self, reset: bool = False) -> dict[str, object]:
        with self.lock:
            if reset:
                self.peak = self.in_flight
                self.requests = 0
            return {
                "in_flight": self.in_flight,
                "peak": self.peak,
                "requests": self.requests,
                "pid": os.getpid(),
                "revision": REVISION,
            }


STATS = Stats()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(addr, Handler)
        self.draining = False
        self.conn_lock = threading.Lock()
        self.idle: set[socket.socket] = set()  # keep-alive connections between requests

    def set_idle(self, sock: socket.socket, idle: bool) -> bool:
        """Mark a connection idle/busy; returns False if it must close (draining)."""
        with self.conn_lock:
            if idle and not self.draining:
                self.idle.add(sock)
            else:
                self.idle.discard(sock)
            return not self.draining

    def drain(self) -> None:
        """Stop keep-alive: wake idle connections so their threads see EOF and end."""
        with self.conn_lock:
            self.draining = True
            idle, self.idle = self.idle, set()
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body are separate writes: without TCP_NODELAY, Nagle holds the body
    # back until the peer's delayed ACK (about 40 ms) on a kept-alive connection
    disable_nagle_algorithm = True
    server: Server

    # --- plumbing ---------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.set_idle(self.connection, True)

    def finish(self) -> None:
        self.server.set_idle(self.connection, False)
        super().finish()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # A request arrived: the connection is busy until its response is done.
        if not self.server.set_idle(self.connection, False):
            self.close_connection = True
        return ok

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if not self.close_connection and not self.server.set_idle(self.connection, True):
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.server.draining:
            self.close_connection = True  # SIGTERM arrived while this request was in flight
        super().send_response(code, message)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        code = getattr(code, "value", code)
        log("INFO", f"{self.command} {self.path} {code}")

    def log_message(self, format: str, *args: object) -> None:
        log("WARNING", format % args)

    def respond(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        no_body = status < 200 or status in (204, 304)
        if not no_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not no_body and self.command != "HEAD":
            self.wfile.write(body)

    def respond_json(self, status: int, obj: object) -> None:
        self.respond(status, json.dumps(obj).encode() + b"\n", "application/json")

    def start_stream(self, status: int, ctype: str, length: int | None = None) -> None:
        """Send headers of a streamed response: Content-Length if known, else chunked."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self._chunked = length is None and self.request_version != "HTTP/1.0"
        if length is not None:
            self.send_header("Content-Length", str(length))
        elif self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True  # HTTP/1.0: the end of the body is the close
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def end_stream(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def body(self) -> Iterator[bytes]:
        """The request body in pieces of at most 64 KiB (Content-Length or chunked)."""
        rfile = self.rfile
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = rfile.readline(1024)
                if not line:
                    raise ConnectionError("body ended early")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size > 0:
                    data = rfile.read(min(size, CHUNK))
                    if not data:
                        raise ConnectionError("body ended early")
                    size -= len(data)
                    yield data
                rfile.readline(8)  # CRLF after the chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = rfile.read(min(left, CHUNK))
                if not data:
                    raise ConnectionError("body ended early")
                left -= len(data)
                yield data

    # --- dispatch ---------------------------------------------------------------------
    def dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = (self.command if self.command != "HEAD" else "GET", url.path)
        counted = not url.path.startswith("/stats")
        STATS.enter(counted)
        try:
            handler = ROUTES.get(route)
            if handler is None and url.path == "/headers":
                handler = Handler.h_headers
            if handler is None:
                for _ in self.body():
                    pass  # keep the connection usable
                known = any(path == url.path for _, path in ROUTES)
                if known:
                    self.respond(405, b"method not allowed\n")
                else:
                    self.respond(404, b"not found\n")
                return
            try:
                handler(self, query)
            except ValueError as e:  # bad query parameter
                self.close_connection = True
                self.respond(400, f"bad request: {e}\n".encode())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            STATS.leave(counted)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = dispatch

    # --- endpoints --------------------------------------------------------------------
    def h_root(self, q: dict[str, str]) -> None:
        self.respond(200, f"hello from {REVISION}\n".encode())

    def h_sleep(self, q: dict[str, str]) -> None:
        ms = int(q.get("ms", "0"))
        time.sleep(ms / 1000)
        self.respond(200, f"slept {ms}\n".encode())

    def h_stats(self, q: dict[str, str]) -> None:
        self.respond_json(200, STATS.snapshot())

    def h_stats_reset(self, q: dict[str, str]) -> None:
        self.respond_json(200, STATS.snapshot(reset=True))

    def h_env(self, q: dict[str, str]) -> None:
        self.respond_json(200, dict(os.environ))

    def h_headers(self, q: dict[str, str]) -> None:
        for _ in self.body():
            pass
        out: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            out[name] = f"{out[name]}, {value}" if name in out else value
        out["_method"] = self.command
        out["_path"] = self.path
        self.respond_json(200, out)

    def h_echo(self, q: dict[str, str]) -> None:
        self.start_stream(200, self.headers.get("Content-Type", "application/octet-stream"))
        for data in self.body():
            self.write_chunk(data)
        self.end_stream()

    def h_count(self, q: dict[str, str]) -> None:
        digest, n = hashlib.sha256(), 0
        for data in self.body():
            digest.update(data)
            n += len(data)
        self.respond_json(200, {"bytes": n, "sha256": digest.hexdigest()})

    def h_bytes(self, q: dict[str, str]) -> None:
        n = int(q.get("n", "0"))
        chunked = q.get("chunked") in ("1", "true")
        self.start_stream(200, "application/octet-stream", None if chunked else n)
        if self.command == "HEAD":
            return
        sent = 0
        while sent < n:
            k = min(CHUNK, n - sent)
            self.write_chunk(PATTERN[:k])  # CHUNK is a multiple of 256: pattern stays aligned
            sent += k
        self.end_stream()

    def h_exit(self, q: dict[str, str]) -> None:
        code = int(q.get("code", "0"))
        self.close_connection = True
        self.respond(200, f"exiting {code}\n".encode())
        log("INFO", f"exiting with code {code}")
        threading.Timer(0.1, os._exit, (code,)).start()

    def h_status(self, q: dict[str, str]) -> None:
        code = int(q.get("code", "200"))
        if not 200 <= code <= 599:
            raise ValueError("code must be 200..599")
        self.respond(code, f"status {code}\n".encode())

    def h_alloc(self, q: dict[str, str]) -> None:
        mb = int(q.get("mb", "1"))
        for _ in range(mb):  # touch every page so it counts against the memory limit
            HELD.append(bytearray(b"\1" * 2**20))
        self.respond(200, f"holding {len(HELD)} MiB\n".encode())

    def h_file(self, q: dict[str, str]) -> None:
        path = q.get("path", "")
        if q.get("write") in ("1", "true"):
            self.append_to(path)
            return
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self.respond(404, f"no file {path}\n".encode())
            return
        self.respond(200, data, "application/octet-stream")

    def append_to(self, path: str) -> None:
        try:
            with open(path, "ab") as handle:
                handle.write(b"x")
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "?")
            self.respond_json(409, {"errno": code, "error": e.strerror})
            return
        self.respond(200, b"written\n")


HELD: list[bytearray] = []

ROUTES = {
    ("GET", "/"): Handler.h_root,
    ("GET", "/sleep"): Handler.h_sleep,
    ("GET", "/stats"): Handler.h_stats,
    ("GET", "/stats/reset"): Handler.h_stats_reset,
    ("GET", "/env"): Handler.h_env,
    ("GET", "/headers"): Handler.h_headers,
    ("POST", "/echo"): Handler.h_echo,
    ("POST", "/count"): Handler.h_count,
    ("GET", "/bytes"): Handler.h_bytes,
    ("GET", "/exit"): Handler.h_exit,
    ("GET", "/status"): Handler.h_status,
    ("GET", "/alloc"): Handler.h_alloc,
    ("GET", "/file"): Handler.h_file,
}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # until we listen
    if os.environ.get("CRASH_AT_START"):
        print("testapp: CRASH_AT_START is set, exiting with code 3", file=sys.stderr, flush=True)
        sys.exit(3)
    delay_ms = int(os.environ.get("STARTUP_DELAY_MS") or 0)
    if delay_ms:
        time.sleep(delay_ms / 1000)
    port = int(os.environ.get("PORT") or 8080)
    server = Server(("0.0.0.0", port))

    def on_term(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever() to return, which runs in this very (main)
        # thread: call it from another one.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log("INFO", f"listening on 0.0.0.0:{port} (revision {REVISION}, pid {os.getpid()})")
    server.serve_forever(poll_interval=0.1)

    # SIGTERM: stop accepting, end idle keep-alive connections, let in-flight requests finish.
    server.server_close()
    server.drain()
    while STATS.active:
        time.sleep(0.01)
    extra_ms = int(os.environ.get("SIGTERM_DELAY_MS") or 0)
    log("INFO", f"SIGTERM: in-flight requests done, exiting in {extra_ms} ms")
    time.sleep(extra_ms / 1000)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
