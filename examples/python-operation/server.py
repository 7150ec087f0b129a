#!/usr/bin/env python3
"""An Ordo remote operation in Python: a grpc.aio server of ordo.v1.Operation/Invoke.

Each operation name maps to a function of the payload text. Ordo calls Invoke
concurrently, once per attempt of an event; each answer comes after a random
delay (attribute `max-delay-ms`, default --max-delay-ms), so completions come
back out of order, and Ordo still releases every stream's results in order.

    python3 server.py --port 50070          # serves shout, whisper, reverse
    python3 server.py --op text=reverse     # and `text`, which reverses

Your own operations: `from server import main; main({"name": function})`.
"""
import argparse, asyncio, pathlib, random, signal, sys

import grpc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"
OPERATIONS = {"shout": str.upper, "whisper": str.lower, "reverse": lambda text: text[::-1]}


def main(operations=OPERATIONS):
    parser = argparse.ArgumentParser(description="Serve ordo.v1.Operation/Invoke.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50070)
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="when an event has no max-delay-ms")
    parser.add_argument("--op", action="append", default=[], metavar="NAME=OPERATION", help="serve NAME as OPERATION")
    parser.add_argument("--proto-root", default=str(PROTO_ROOT), help="the directory holding ordo/v1/operation.proto")
    args = parser.parse_args()
    ops = dict(operations)
    for alias in args.op:
        name, _, target = alias.partition("=")
        if target not in operations:
            parser.error(f"--op {alias}: {target!r} is none of {', '.join(operations)}")
        ops[name] = operations[target]
    sys.path.append(args.proto_root)  # compiles operation.proto in memory (grpcio-tools): no generated files
    protos, services = grpc.protos_and_services("ordo/v1/operation.proto")

    def failed(message):  # retry=False: Ordo releases FAILED (with a dead letter) instead of retrying
        return protos.InvokeResponse(error=protos.InvokeError(message=message, retry=False))

    class Operation(services.OperationServicer):
        async def Invoke(self, request, context):
            run = ops.get(request.operation)
            if run is None:
                return failed(f"unknown operation {request.operation!r}; this server runs {', '.join(ops)}")
            try:
                max_delay_ms = float(request.attributes.get("max-delay-ms", args.max_delay_ms))
                text = request.payload.decode()
            except (ValueError, UnicodeDecodeError) as error:
                return failed(str(error))
            await asyncio.sleep(random.uniform(0, max(max_delay_ms, 0)) / 1000)
            return protos.InvokeResponse(payload=run(text).encode())

    async def serve():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        services.add_OperationServicer_to_server(Operation(), server)
        server.add_insecure_port(f"{args.host}:{args.port}")
        await server.start()
        print(f"serving {', '.join(ops)} on {args.host}:{args.port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=5)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
