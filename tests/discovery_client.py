#!/usr/bin/env python3
"""An independent client of the agent's discovery stream: gRPC's C core
(grpcio) with Envoy's published protos (xds-protos), speaking incremental
aggregated discovery (DeltaAggregatedResources) on the agent's Unix socket.

usage: discovery_client.py SOCKET TOKEN_FILE|- TYPE_URL [NAME,...]

Subscribes to every resource of TYPE_URL, or to the names given (a name,
or <namespace>/* for a whole namespace). Prints one JSON line per
response: {"nonce", "type_url", "system_version_info", "bytes" (its
encoded size), "resources": [{"name", "version", "type_url",
"value_hex"}], "removed": [...]}. gRPC's default limits apply (4 MiB per
message received). Reads commands from stdin,
one per line: "ACK" or "NACK <message>" answers the latest response;
"QUIT" ends the stream. On a gRPC error prints {"error": CODE, "message"}
and exits 3.
"""
import json
import queue
import sys
import threading

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2


def main() -> int:
    socket, token_file, type_url = sys.argv[1], sys.argv[2], sys.argv[3]
    names = [n for n in sys.argv[4].split(",") if n] if len(sys.argv) > 4 else []
    metadata = []
    if token_file != "-":
        with open(token_file) as f:
            metadata.append(("authorization", "Bearer " + f.read().strip()))
    requests = queue.Queue()
    requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names))
    latest = {"nonce": ""}

    def outgoing():
        while True:
            r = requests.get()
            if r is None:
                return
            yield r

    def commands():
        for line in sys.stdin:
            line = line.strip()
            if line == "QUIT":
                break
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=latest["nonce"])
            if line.startswith("NACK"):
                req.error_detail.CopyFrom(status_pb2.Status(code=3, message=line[4:].strip()))
            requests.put(req)
        requests.put(None)

    threading.Thread(target=commands, daemon=True).start()
    options = [("grpc.default_authority", "mizzen-agent")]
    with grpc.insecure_channel("unix:" + socket, options=options) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        try:
            for resp in stub.DeltaAggregatedResources(outgoing(), metadata=metadata):
                latest["nonce"] = resp.nonce
                print(json.dumps({
                    "nonce": resp.nonce,
                    "type_url": resp.type_url,
                    "system_version_info": resp.system_version_info,
                    "bytes": resp.ByteSize(),
                    "resources": [{
                        "name": r.name,
                        "version": r.version,
                        "type_url": r.resource.type_url,
                        "value_hex": r.resource.value.hex(),
                    } for r in resp.resources],
                    "removed": list(resp.removed_resources),
                }), flush=True)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return 0
            print(json.dumps({"error": e.code().name, "message": e.details()}), flush=True)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
