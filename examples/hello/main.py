"""The smallest Cloudlet service: answers every GET on $PORT, stops cleanly on SIGTERM."""

import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = os.environ.get("K_SERVICE", "hello")
REVISION = os.environ.get("K_REVISION", "local")


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # headers and body are separate writes: without TCP_NODELAY, Nagle holds the body
    # back until the peer's delayed ACK (about 40 ms) on a kept-alive connection
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = f"Hello from Cloudlet! (service {SERVICE}, revision {REVISION})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Hello)
    server.daemon_threads = True
    # shutdown() blocks until serve_forever() returns, so it must run in another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"hello: listening on port {server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    print("hello: SIGTERM received, bye", flush=True)


if __name__ == "__main__":
    main()
