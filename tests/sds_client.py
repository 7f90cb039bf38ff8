#!/usr/bin/env python3
"""An independent SDS client: gRPC's C core (grpcio) with Envoy's published
protos (xds-protos), fetching secrets from the Mizzen agent's Unix socket.

usage: sds_client.py SOCKET TOKEN_FILE NAME...

Prints one JSON object: {"version": ..., "secrets": {name: {...}}}, where a
tls_certificate has "chain" and "key" PEM, and a validation_context has
"trusted_ca" PEM. On a gRPC error prints {"error": CODE, "message": ...}
and exits 3.
"""
import json
import sys

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def main() -> int:
    socket, token_file, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(token_file) as f:
        token = f.read().strip()
    # gRPC's C core would send the socket path as :authority, which is not a
    # valid HTTP/2 authority; name the agent instead, as Envoy and grpc-go do.
    options = [("grpc.default_authority", "mizzen-agent")]
    with grpc.insecure_channel("unix:" + socket, options=options) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=names)
        try:
            response = stub.FetchSecrets(
                request, metadata=[("authorization", "Bearer " + token)], timeout=30
            )
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}))
            return 3
    out = {"version": response.version_info, "type_url": response.type_url, "secrets": {}}
    for any_ in response.resources:
        s = secret_pb2.Secret()
        if not any_.Unpack(s):
            raise SystemExit("resource is not a Secret: " + any_.type_url)
        kind = s.WhichOneof("type")
        if kind == "tls_certificate":
            out["secrets"][s.name] = {
                "kind": kind,
                "chain": s.tls_certificate.certificate_chain.inline_bytes.decode(),
                "key": s.tls_certificate.private_key.inline_bytes.decode(),
            }
        elif kind == "validation_context":
            out["secrets"][s.name] = {
                "kind": kind,
                "trusted_ca": s.validation_context.trusted_ca.inline_bytes.decode(),
            }
        else:
            out["secrets"][s.name] = {"kind": kind}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
