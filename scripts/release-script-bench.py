#!/usr/bin/env python3
"""Times Ordo's release script alone, against a private redis-server.

    python3 scripts/release-script-bench.py [--script PATH] STREAMS PER_CALL PER_VISIT RESULTS

Each script call carries PER_CALL stream visits of PER_VISIT in-order ORDERED
results each; visits go round-robin over STREAMS streams (as workload (d)
sends its events), until RESULTS results are stored. It prints the EVALSHA
time per result from `INFO commandstats` (Redis's own clock, so the client's
cost is not in it) and the commands the script called, per result. It
starts `redis-server` (no persistence) on a free port and stops it at the
end; no Python package is needed. See docs/benchmarks.md ("Where a stream
visit's cost goes") for what it measured.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


class Resp:
    """The few RESP2 commands this needs, over one socket."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self.reply()

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")


def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default=os.path.join(here, "../crates/reassembler/src/release.lua"))
    p.add_argument("--slots-per-channel", type=int, default=256,
                   help="slots that share a release channel (256: a single node's layout, "
                        "ordo_core::keys::SINGLE_NODE_SLOTS_PER_CHANNEL; 1: a channel per slot)")
    p.add_argument("streams", type=int)
    p.add_argument("per_call", type=int)
    p.add_argument("per_visit", type=int)
    p.add_argument("results", type=int)
    a = p.parse_args()
    if min(a.streams, a.per_call, a.per_visit, a.results) < 1:
        p.error("every number must be at least 1")
    if not shutil.which("redis-server"):
        sys.exit("redis-server not found (bash scripts/install-deps.sh installs it)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ordo-relbench-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                r = Resp(port)
                r.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit("redis-server did not answer")
        with open(a.script, "rb") as f:
            sha = r.call("SCRIPT", "LOAD", f.read()).decode()
        names = [f"bench-{i}" for i in range(a.streams)]
        # The stream's release channel on a single node (ordo_core::keys::release_channel_slot);
        # only equality matters here, so the slot number stands in for its tag.
        group = max(1, a.slots_per_channel)
        channel = {}
        for n in names:
            slot = crc16(n.encode()) % 16384
            channel[n] = f"ordo:released:{{{slot - slot % group}}}"

        nexts = dict.fromkeys(names, 0)
        body = b"\x0a\x05hello\x10\x01" + b"x" * 16
        r.call("CONFIG", "RESETSTAT")
        sent, cursor, started = 0, 0, time.time()
        while sent < a.results:
            keys, argv = ["ordo:dlq"], [1000, 120000, 10000, 240000]
            for _ in range(a.per_call):
                n = names[cursor % a.streams]
                cursor += 1
                keys += [f"ordo:{{{n}}}:meta", f"ordo:{{{n}}}:pend", f"ordo:{{{n}}}:log"]
                argv += [n, channel[n], "1", a.per_visit]
                for _ in range(a.per_visit):
                    argv += [nexts[n], body, b""]
                    nexts[n] += 1
                sent += a.per_visit
            flags = r.call("EVALSHA", sha, len(keys), *keys, *argv)
            if b"0" in flags:
                sys.exit("the script called a fresh result a duplicate: is another server on this port?")
        wall = time.time() - started
        stats = {}
        for line in r.call("INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line[len("cmdstat_"):].split(":", 1)
                stats[name] = dict(kv.split("=") for kv in fields.split(","))
        evalsha = stats.pop("evalsha")
        stats.pop("config|resetstat", None)
        print(f"{os.path.basename(a.script)}: {a.streams} streams, {a.per_call} visits per call, "
              f"{a.per_visit} results per visit, {sent} results: EVALSHA "
              f"{int(evalsha['usec']) / sent:.2f} µs per result ({evalsha['calls']} calls, {wall:.1f} s wall)")
        for name, s in sorted(stats.items()):
            print(f"  {name}: {int(s['calls']) / sent:.2f} per result, {float(s['usec_per_call']):.2f} µs per call")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
