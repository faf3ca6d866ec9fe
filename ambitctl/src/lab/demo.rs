//! The demo the lab starts with `--demo`.

/// Namespace `demo` (ambient) with a client and two echo pods (v1 on node-1, v2 on node-2),
/// Services `echo`, `echo-v1` and `echo-v2`, and namespace `legacy` (not enrolled) with its own
/// client.
///
/// L4: a policy lets only the client's identity, and the waypoint's, reach echo's pods (with a
/// waypoint in the path the destination ztunnel sees the waypoint's identity, not the client's).
///
/// L7: a waypoint (Gateway `waypoint`, class `istio-waypoint`) serves Service `echo`
/// (`istio.io/use-waypoint`); an HTTPRoute sends `x-canary: true` to v2 and splits the rest
/// 90/10 between v1 and v2; an AuthorizationPolicy on the Service refuses paths under `/admin`.
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
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: demo}
spec:
  selector: {app: echo, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec:
  selector: {app: echo, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client, cluster.local/ns/demo/sa/waypoint]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-no-admin, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: echo}]
  action: DENY
  rules:
  # Scoped to the HTTP port (service port 80, target port 8080): TCP traffic cannot match the
  # paths, and a DENY rule whose HTTP-only fields are dropped for TCP refuses everything, so
  # without `ports` echo's TCP port 9000 would be refused through the waypoint too.
  - to: [{operation: {ports: ["80", "8080"], paths: ["/admin", "/admin/*"]}}]
"#;

/// What to try once the demo is up. The lab runs as root; `sudo` prefixes the commands only for
/// a user who started it through sudo (root on a machine without sudo runs them as they are).
pub(super) fn hints(
    echo_ip: &str,
    node_ip: &str,
    program: &str,
    node_netns: &str,
    through_sudo: bool,
) -> String {
    let sudo = if through_sudo { "sudo " } else { "" };
    format!(
        r#"
The demo is up. Try:

  1. A call the policies allow (demo/client has the identity they name); the waypoint routes it,
     9 in 10 to v1 (echo-1, node-1) and 1 in 10 to v2 (echo-2, node-2):
       {sudo}{program} lab exec demo/client -- curl -s http://echo.demo.svc.cluster.local/

  2. One the L4 policy refuses (legacy/client is outside the mesh, so it has no identity):
       {sudo}{program} lab exec legacy/client -- curl -s -m 3 http://{echo_ip}:8080/ || echo refused

  3. The Istio metrics of node-1's ztunnel:
       {sudo}ip netns exec {node_netns} curl -s http://{node_ip}:15020/metrics | grep istio_tcp_connections_opened_total

  4. The canary header: the HTTPRoute sends it to v2 every time:
       {sudo}{program} lab exec demo/client -- curl -s -H 'x-canary: true' http://echo.demo.svc.cluster.local/

  5. A path the waypoint's policy refuses (403 RBAC: access denied):
       {sudo}{program} lab exec demo/client -- curl -s -i http://echo.demo.svc.cluster.local/admin

See `{sudo}{program} lab status` (the waypoint's metrics URL is there too), and
`{sudo}{program} lab down` to remove it all.
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_mesh::Object;

    #[test]
    fn the_demo_parses_and_has_its_l7_part() {
        let (objects, errors) = ambit_mesh::parse_documents(OBJECTS, "demo");
        assert!(errors.is_empty(), "{errors:?}");
        let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        for key in [
            "Service demo/echo-v1",
            "Service demo/echo-v2",
            "Gateway demo/waypoint",
            "HTTPRoute demo/echo",
            "AuthorizationPolicy demo/echo-no-admin",
        ] {
            assert!(keys.contains(&key.to_string()), "{key} missing: {keys:?}");
        }
        let echo = objects
            .iter()
            .find_map(|o| match o {
                Object::Service(s) if s.metadata.name == "echo" => Some(s),
                _ => None,
            })
            .unwrap();
        assert_eq!(echo.metadata.labels["istio.io/use-waypoint"], "waypoint");
        let hints_for_root = hints("10.0.0.1", "10.1.0.1", "ambitctl", "netns", false);
        assert!(
            hints_for_root.contains("-H 'x-canary: true'"),
            "{hints_for_root}"
        );
        assert!(
            hints_for_root.contains("403 RBAC: access denied"),
            "{hints_for_root}"
        );
        assert!(!hints_for_root.contains("sudo"), "{hints_for_root}");
        assert!(
            hints_for_root.contains("\n       ambitctl lab exec demo/client -- curl"),
            "{hints_for_root}"
        );
        let hints_for_sudo = hints("10.0.0.1", "10.1.0.1", "ambitctl", "netns", true);
        assert!(
            hints_for_sudo.contains("sudo ambitctl lab exec demo/client")
                && hints_for_sudo.contains("sudo ip netns exec netns"),
            "{hints_for_sudo}"
        );
    }
}
