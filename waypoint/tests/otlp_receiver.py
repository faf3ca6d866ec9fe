"""A small OTLP/HTTP trace receiver for the waypoint's tracing test.

Listens on 127.0.0.1 (a free port), takes POST /v1/traces with an
`application/x-protobuf` ExportTraceServiceRequest, decodes it with the
OpenTelemetry project's own message types (the `opentelemetry-proto` package),
and prints one JSON line per span on stdout: the resource's service.name, ids
in hex, kind, name, status code and attributes. The first line is
`listening <port>`. Anything it cannot decode is answered 400 and printed as
an `error` line, so the test sees it.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.reply(404, b"")
            print(json.dumps({"error": f"unexpected {self.path} {self.headers.get('content-type')}"}), flush=True)
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as error:  # noqa: BLE001 - reported to the test
            self.reply(400, b"")
            print(json.dumps({"error": f"undecodable: {error}"}), flush=True)
            return
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    print(
                        json.dumps(
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
                        ),
                        flush=True,
                    )
        self.reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def reply(self, status, payload):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    # Ends when the test closes stdin (or kills it).
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
