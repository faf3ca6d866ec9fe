//! The demo the lab starts with `--demo`.

/// Namespace `demo` (ambient) with a client and two echo pods (one per node), service `echo`, and
/// a policy that lets only the client's identity call echo; namespace `legacy` (not enrolled)
/// with its own client.
pub(super) const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo, version: v1}}
spec: {nodeName: node-1, serviceAccountName: echo}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: demo, labels: {app: echo, version: v2}}
spec: {nodeName: node-2, serviceAccountName: echo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy, labels: {app: client}}
spec: {nodeName: node-1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"#;

/// What to try once the demo is up.
pub(super) fn hints(echo_ip: &str, node_ip: &str, program: &str, node_netns: &str) -> String {
    format!(
        r#"
The demo is up. Try:

  1. A call the policy allows (demo/client has the identity it names), answered by either node:
       sudo {program} lab exec demo/client -- curl -s http://echo.demo.svc.cluster.local/

  2. One the policy refuses (legacy/client is outside the mesh, so it has no identity):
       sudo {program} lab exec legacy/client -- curl -s -m 3 http://{echo_ip}:8080/ || echo refused

  3. The Istio metrics of node-1's ztunnel:
       sudo ip netns exec {node_netns} curl -s http://{node_ip}:15020/metrics | grep istio_tcp_connections_opened_total

See `sudo {program} lab status`, and `sudo {program} lab down` to remove it all.
"#
    )
}
