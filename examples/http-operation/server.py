#!/usr/bin/env python3
"""An Ordo remote operation over HTTP, with nothing but Python's standard library.

Ordo's worker POSTs each attempt of an event to the operation's URL: the
payload is the body; `Ordo-Operation`, `Ordo-Stream-Id`, `Ordo-Sequence`,
`Ordo-Attempt`, `Ordo-Deadline-Unix-Ms` and `Ordo-Attr-<name>` (the event's
attributes) are headers. A 2xx answer's body is the result; a 4xx is FAILED
at once (no retry); a 5xx, a refused connection or a timeout is retried.

    python3 server.py --port 50080     # POST /shout, /whisper, /reverse

The operation is the URL's last path segment (else the Ordo-Operation header).
Attributes that provoke failures, to watch Ordo handle them:
    status=<code>        answer with that status (e.g. 400 or 503)
    fail-attempts=<n>    answer 503 while Ordo-Attempt <= n, then succeed
    max-delay-ms=<ms>    answer after a random delay of up to <ms> (default --max-delay-ms)
`GET /calls` returns how many times each stream#sequence was called (JSON).
"""
import argparse, collections, json, random, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPERATIONS = {"shout": str.upper, "whisper": str.lower, "reverse": lambda text: text[::-1]}
CALLS, LOCK = collections.Counter(), threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Ordo reuses its connections
    max_delay_ms = 5.0

    def answer(self, status, body, content_type="text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") != "/calls":
            return self.answer(404, b"POST an event to /<operation>; GET /calls\n")
        with LOCK:
            body = json.dumps(dict(CALLS), sort_keys=True).encode()
        self.answer(200, body, "application/json")

    def do_POST(self):
        payload = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        attr = lambda name, default=None: self.headers.get(f"Ordo-Attr-{name}", default)
        with LOCK:
            CALLS[f"{self.headers.get('Ordo-Stream-Id', '')}#{self.headers.get('Ordo-Sequence', '')}"] += 1
        name = self.path.rstrip("/").rsplit("/", 1)[-1] or self.headers.get("Ordo-Operation", "")
        try:
            attempt = int(self.headers.get("Ordo-Attempt", 1))
            status = int(attr("status", 200))
            fail_attempts = int(attr("fail-attempts", 0))
            max_delay_ms = float(attr("max-delay-ms", self.max_delay_ms))
            text = payload.decode()
        except (ValueError, UnicodeDecodeError) as error:
            return self.answer(400, f"bad event: {error}\n".encode())
        time.sleep(random.uniform(0, max(max_delay_ms, 0)) / 1000)
        if name not in OPERATIONS:
            return self.answer(404, f"unknown operation {name!r}; POST to /{', /'.join(OPERATIONS)}\n".encode())
        if status != 200:
            return self.answer(status, f"provoked status {status}\n".encode())
        if attempt <= fail_attempts:
            return self.answer(503, f"provoked 503 on attempt {attempt} of {fail_attempts} failing\n".encode())
        self.answer(200, OPERATIONS[name](text).encode(), "application/octet-stream")

    def log_message(self, format, *args):  # one line per request is too much at thousands of events
        pass


def main():
    parser = argparse.ArgumentParser(description="An HTTP operation for Ordo.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50080)
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="when an event has no max-delay-ms")
    args = parser.parse_args()
    Handler.max_delay_ms = args.max_delay_ms
    ThreadingHTTPServer.request_queue_size = 512  # Ordo opens many connections at once (default 5)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"serving POST /{', /'.join(OPERATIONS)} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
