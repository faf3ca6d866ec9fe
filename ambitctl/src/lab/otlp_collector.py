"""A small OTLP/HTTP trace collector: the lab's (ambitctl lab up) and the waypoint tests'.

Takes POST /v1/traces with an `application/x-protobuf` ExportTraceServiceRequest,
decodes it with the OpenTelemetry project's own message types (the
`opentelemetry-proto` package from PyPI), and writes one JSON line per span: the
resource's service.name, ids in hex, kind, name, status code and attributes.
Anything it cannot decode is answered 400 and written as an `error` line.

    otlp_collector.py [--listen HOST:PORT] [--out FILE]

Listens on 127.0.0.1 on a free port by default and writes spans to stdout
(else appends them to FILE). The first line on stdout is `listening <port>`.
It runs until killed, or until its stdin closes when stdin is a pipe.
"""

import argparse
import json
import os
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


OUT = sys.stdout
LOCK = threading.Lock()


def emit(record):
    with LOCK:
        OUT.write(json.dumps(record) + "\n")
        OUT.flush()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.reply(404, b"")
            emit({"error": f"unexpected {self.path} {self.headers.get('content-type')}"})
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as error:  # noqa: BLE001 - reported to the test
            self.reply(400, b"")
            emit({"error": f"undecodable: {error}"})
            return
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    emit(
                        {
                            "service": resource.get("service.name"),
                            "scope": scope_spans.scope.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "status": span.status.code,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                        }
                    )
        self.reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def reply(self, status, payload):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main():
    global OUT
    parser = argparse.ArgumentParser(description="OTLP/HTTP trace collector writing JSON lines")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    parser.add_argument("--out", help="append spans to this file (default: stdout)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if args.out:
        OUT = open(args.out, "a", encoding="utf-8")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
        # Driven by a test through a pipe: ends when the pipe closes.
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sys.stdin.read()
        server.shutdown()
    else:
        server.serve_forever()


if __name__ == "__main__":
    main()
