"""A gRPC server and client for mesh tests, with grpcio (an independent
HTTP/2 and gRPC implementation) and no generated code: messages are raw
bytes.

  grpc_echo.py serve ADDR        Echo/Unary answers "<HOSTNAME> <request>";
                                 Echo/Chat answers each message of a
                                 bidirectional stream as it arrives;
                                 Echo/Fail aborts with NOT_FOUND "no such thing"
  grpc_echo.py unary ADDR TEXT [N [KEY=VALUE]]
                                 prints the answer (of N calls in turn on
                                 one channel, each with metadata KEY=VALUE)
  grpc_echo.py chat ADDR N       sends N messages one at a time, each only
                                 after the previous answer came back (so the
                                 stream is bidirectional in flight); prints
                                 the answers
  grpc_echo.py fail ADDR         prints "<status code name> <details>"
  grpc_echo.py hold-chat ADDR S  opens a Chat stream, prints "open" once its
                                 first message was answered, then keeps it
                                 open until it ends or S seconds pass;
                                 prints "ended <status code name>" or "held"
"""
import os
import queue
import sys
from concurrent import futures

import grpc

SERVICE = "mizzen.test.Echo"


def serve(addr):
    host = os.environ.get("HOSTNAME", "?")

    def unary(request, context):
        return host.encode() + b" " + request

    def chat(requests, context):
        for r in requests:
            yield b"echo " + r

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    print("listening", addr, flush=True)
    server.wait_for_termination()


def main():
    mode, addr = sys.argv[1], sys.argv[2]
    if mode == "serve":
        return serve(addr)
    channel = grpc.insecure_channel(addr)
    if mode == "unary":
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        n = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        metadata = [tuple(sys.argv[5].split("=", 1))] if len(sys.argv) > 5 else None
        for _ in range(n):
            print(call(sys.argv[3].encode(), timeout=10, metadata=metadata).decode(), flush=True)
    elif mode == "chat":
        n = int(sys.argv[3])
        outgoing = queue.Queue()
        call = channel.stream_stream(f"/{SERVICE}/Chat")
        replies = call(iter(outgoing.get, None), timeout=20)
        for i in range(n):
            outgoing.put(f"m{i}".encode())
            print(next(replies).decode(), flush=True)
        outgoing.put(None)
        rest = list(replies)
        if rest:
            sys.exit(f"unexpected extra replies: {rest}")
    elif mode == "hold-chat":
        secs = float(sys.argv[3])
        outgoing = queue.Queue()
        call = channel.stream_stream(f"/{SERVICE}/Chat")
        replies = call(iter(outgoing.get, None), timeout=secs)
        outgoing.put(b"first")
        next(replies)
        print("open", flush=True)
        try:
            for _ in replies:
                pass
            print("ended OK", flush=True)
        except grpc.RpcError as e:
            code = e.code().name
            print("held" if code == "DEADLINE_EXCEEDED" else f"ended {code}", flush=True)
    elif mode == "fail":
        call = channel.unary_unary(f"/{SERVICE}/Fail")
        try:
            call(b"x", timeout=10)
            sys.exit("Fail succeeded")
        except grpc.RpcError as e:
            print(e.code().name, e.details())
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
