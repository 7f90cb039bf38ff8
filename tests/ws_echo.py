"""A WebSocket server and client for mesh tests, with the `websockets`
library (an independent implementation of the upgrade and the protocol).

  ws_echo.py serve PORT         first message to each client: the request's
                                x-forwarded-client-cert (or "none"); then
                                every message comes back as "<HOSTNAME> <msg>"
  ws_echo.py chat URL N         prints the first message, then sends N
                                messages one at a time and prints each answer
"""
import os
import sys

from websockets.sync.client import connect
from websockets.sync.server import serve


def main():
    mode = sys.argv[1]
    if mode == "serve":
        host = os.environ.get("HOSTNAME", "?")

        def handler(ws):
            ws.send(ws.request.headers.get("x-forwarded-client-cert", "none"))
            for message in ws:
                ws.send(f"{host} {message}")

        with serve(handler, "0.0.0.0", int(sys.argv[2])) as server:
            print("listening", sys.argv[2], flush=True)
            server.serve_forever()
    elif mode == "chat":
        url, n = sys.argv[2], int(sys.argv[3])
        with connect(url, open_timeout=10, close_timeout=5) as ws:
            print(ws.recv(timeout=10), flush=True)
            for i in range(n):
                ws.send(f"m{i}")
                print(ws.recv(timeout=10), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
