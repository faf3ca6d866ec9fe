"""A real gRPC client (Debian's python3-grpcio) against ambit-echo's gRPC service.

Protobuf is encoded and decoded by hand here so that nothing generated from our .proto files is
trusted. Usage: grpc_client.py HOST:PORT. Prints one JSON object with what it saw.
"""

import json
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_field(number, text):
    data = text.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def read_varint(data, i):
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, i


def decode(data):
    """Fields of a message: number -> list of values (bytes for length-delimited, int for varint)."""
    fields = {}
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i : i + length], i + length
        else:
            raise ValueError("unexpected wire type %d" % wire)
        fields.setdefault(number, []).append(value)
    return fields


def main():
    target = sys.argv[1]
    seen = {}
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=None,
            response_deserializer=None,
        )
        answer = check(b"", timeout=10)
        seen["health_raw"] = answer.hex()
        seen["health_status"] = decode(answer).get(1, [0])[0]

        echo = channel.unary_unary(
            "/ambit.echo.v1.Echo/Echo",
            request_serializer=None,
            response_deserializer=None,
        )
        answer = echo(
            string_field(1, "hello from python"),
            metadata=[("x-test-marker", "m1")],
            timeout=10,
        )
        fields = decode(answer)
        text = lambda n: fields.get(n, [b""])[0].decode()
        seen["echo"] = {
            "message": text(1),
            "pod": text(2),
            "namespace": text(3),
            "version": text(4),
            "node": text(5),
            "peer": text(6),
        }
        metadata = {}
        for entry in fields.get(7, []):
            kv = decode(entry)
            metadata[kv[1][0].decode()] = kv.get(2, [b""])[0].decode()
        seen["echo"]["metadata"] = metadata

        try:
            echo(
                string_field(1, "fail me"),
                metadata=[("x-echo-grpc-status", "5")],
                timeout=10,
            )
            seen["asked_status"] = "OK"
        except grpc.RpcError as error:
            seen["asked_status"] = error.code().name
            seen["asked_details"] = error.details()

        try:
            channel.unary_unary(
                "/ambit.echo.v1.Echo/Nope",
                request_serializer=None,
                response_deserializer=None,
            )(b"", timeout=10)
            seen["unknown_method"] = "OK"
        except grpc.RpcError as error:
            seen["unknown_method"] = error.code().name
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
