//! The explanation of one flow: what each step found, in a stable, serializable shape.

use serde::Serialize;

/// Everything `ambitctl explain` found about one flow.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The flow as given (with the HTTP defaults filled in when HTTP applies).
    pub flow: FlowSummary,
    /// Step 1: the source pod.
    pub source: Source,
    /// Step 2: what the destination resolves to.
    pub destination: Destination,
    /// Step 3: whether a waypoint is in the path, and why.
    pub waypoint: WaypointStep,
    /// Step 4: the waypoint's route choice, when a waypoint serves the flow.
    pub route: Option<RouteStep>,
    /// Step 5: authorization at each hop that checks any (the waypoint, then each destination
    /// endpoint's ztunnel).
    pub hops: Vec<Hop>,
    /// Step 6: the outcome.
    pub verdict: Verdict,
    /// Translation warnings about the objects on the path (objects honoured only in part).
    pub warnings: Vec<String>,
}

/// The flow as explained.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowSummary {
    /// `namespace/pod`.
    pub from: String,
    /// `host:port` as given.
    pub to: String,
    /// The method, when HTTP applies.
    pub method: Option<String>,
    /// The path, when HTTP applies.
    pub path: Option<String>,
    /// The request headers given.
    pub headers: Vec<Header>,
}

/// A request header.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    /// Lower-case name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// The source pod.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// `namespace/pod`.
    pub pod: String,
    /// The node it runs on.
    pub node: String,
    /// Its IP, if it has one.
    pub ip: Option<String>,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: String,
    /// True when ztunnel captures its traffic.
    pub captured: bool,
    /// Why it is or is not captured.
    pub enrollment: String,
}

/// What the destination resolves to.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The host as given.
    pub host: String,
    /// The port dialed.
    pub port: u16,
    /// The IP the pod connects to.
    pub ip: String,
    /// How the host was resolved.
    pub resolved: String,
    /// `service` (a Service VIP), `workload` (a pod IP) or `unknown` (an address the mesh does
    /// not know).
    pub addressed: String,
    /// The Service addressed.
    pub service: Option<ServiceInfo>,
    /// The pod addressed (pod-IP addressed flows).
    pub workload: Option<Endpoint>,
    /// Every endpoint of the Service addressed, with whether it can take this flow.
    pub endpoints: Vec<Endpoint>,
}

/// The Service addressed and its port.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    /// `namespace/name`.
    pub service: String,
    /// FQDN.
    pub hostname: String,
    /// The VIP dialed.
    pub vip: String,
    /// The service port, if the Service exposes the port dialed.
    pub port: Option<u16>,
    /// Its target port (`None` for a named port: each endpoint says).
    pub target_port: Option<u16>,
    /// The declared application protocol (`http`, `http2`, `grpc`, `tcp`, `tls`, `unknown`).
    pub app_protocol: String,
    /// The waypoint bound to the Service (`namespace/hostname` or IP), if any.
    pub waypoint: Option<String>,
}

/// A pod (or other workload) that can take the flow.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `namespace/name`.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Its IP.
    pub ip: String,
    /// The port it takes the flow on, when known.
    pub port: Option<u16>,
    /// Ready.
    pub healthy: bool,
    /// In the mesh (reached over HBONE).
    pub captured: bool,
    /// Its SPIFFE identity.
    pub identity: String,
    /// True when endpoint choice (health, routing preferences, port) can pick it.
    pub eligible: bool,
}

/// Step 3: the waypoint.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointStep {
    /// True when the source's ztunnel sends the flow to a waypoint.
    pub in_path: bool,
    /// Why (or why not), as a sentence.
    pub reason: String,
    /// The Gateway (`namespace/name`) of the waypoint in the path, or of a binding that did not
    /// take effect.
    pub gateway: Option<String>,
    /// The label that binds it.
    pub label: Option<LabelRef>,
    /// The Gateway's effective `istio.io/waypoint-for`.
    pub waypoint_for: Option<String>,
    /// `service` or `workload`: how the flow was addressed when it went to the waypoint.
    pub addressed_as: Option<String>,
    /// The waypoint pod (`namespace/name`).
    pub pod: Option<String>,
    /// The waypoint pod's IP.
    pub ip: Option<String>,
    /// The waypoint's identity (what destination ztunnels see).
    pub identity: Option<String>,
}

/// A label on an object.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelRef {
    /// `Kind namespace/name` (or `Namespace name`).
    pub object: String,
    /// The label key.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// Step 4: the waypoint's routing.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStep {
    /// `http` or `tcp`, as the waypoint serves the port.
    pub protocol: String,
    /// `matched` (a rule matched), `no-match` (routes attach but none matches: 404),
    /// `service-default` (no route attaches to the port: the Service itself) or `pod-addressed`
    /// (pod IPs use no routes).
    pub decision: String,
    /// The route resource (`HTTPRoute/<ns>/<name>`, `GRPCRoute/...`, `VirtualService/...`).
    pub route: Option<String>,
    /// The index of the rule in the route.
    pub rule: Option<usize>,
    /// The rule's name, if it has one.
    pub rule_name: Option<String>,
    /// The rule's request filters, by kind.
    pub filters: Vec<String>,
    /// What the filters answer instead of forwarding (a redirect), as `<status> <location>`.
    pub redirect: Option<String>,
    /// The backends the rule (or the Service) can send to.
    pub backends: Vec<Backend>,
}

/// A backend of the route, and the endpoints it can choose.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// `namespace/hostname` of the Service (or `namespace/pod` for a pod-addressed flow).
    pub service: String,
    /// The Service port.
    pub port: u16,
    /// Relative weight (0: never chosen).
    pub weight: u32,
    /// The DestinationRule subset, if any.
    pub subset: Option<String>,
    /// Why requests sent here fail before reaching an endpoint (invalid backend, unknown
    /// subset, no endpoint).
    pub problem: Option<String>,
    /// The endpoints it can choose among.
    pub endpoints: Vec<Endpoint>,
}

/// Where a hop's authorization runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopKind {
    /// The waypoint (L7 when the port is HTTP).
    Waypoint,
    /// The destination pod's ztunnel (L4).
    Destination,
}

/// Authorization at one hop.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// Waypoint or destination.
    pub kind: HopKind,
    /// Which proxy, as a phrase (`waypoint demo/waypoint`, `ztunnel on node-2 for demo/echo-2`).
    pub at: String,
    /// The destination endpoint (`namespace/pod`) for a destination hop.
    pub endpoint: Option<String>,
    /// The peer identity the proxy verifies (`None`: plaintext, no identity).
    pub peer: Option<String>,
    /// The source address the proxy sees.
    pub source_ip: String,
    /// The destination `ip:port` policies see.
    pub destination: String,
    /// True when the HTTP request's fields are evaluated (L7), false for the connection (L4).
    pub l7: bool,
    /// Every policy that applies here, in evaluation order, with what it did.
    pub policies: Vec<PolicyVerdict>,
    /// The hop's decision.
    pub allowed: bool,
    /// The engine's reason sentence.
    pub reason: String,
    /// The policy and rule that decided, if one did.
    pub decided_by: Option<PolicyRef>,
}

/// One applicable policy at a hop.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// `namespace/name`.
    pub policy: String,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    /// Evaluated but never enforced.
    pub dry_run: bool,
    /// True when one of its rules matched.
    pub matched: bool,
    /// The first rule that matched.
    pub rule: Option<usize>,
    /// True for the policy that decided the hop.
    pub decides: bool,
}

/// A policy and the rule in it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// `namespace/name`.
    pub policy: String,
    /// `ALLOW` or `DENY`.
    pub action: String,
    /// Index of the rule.
    pub rule: usize,
}

/// How the flow's bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// HBONE (mTLS) from the source's ztunnel to the destination's.
    Hbone,
    /// HBONE to the waypoint, which opens HBONE to the destination.
    HboneViaWaypoint,
    /// The source is captured but the destination is outside the mesh: plain TCP.
    PlaintextToOutsideMesh,
    /// The source is not captured: plain TCP straight to the destination.
    PlaintextDirect,
    /// An address the mesh does not know: ztunnel passes the connection through.
    Passthrough,
}

/// What happens to the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every endpoint it can reach accepts it.
    Allowed,
    /// Some endpoints accept it, others refuse it.
    PartlyDenied,
    /// An authorization policy refuses it.
    Denied,
    /// STRICT PeerAuthentication refuses a caller without a mesh identity.
    RefusedStrict,
    /// The waypoint's routes attach to the port but none matches (404).
    NoRoute,
    /// A route's filter answers with a redirect.
    Redirected,
    /// The chosen backend is invalid (500).
    InvalidBackend,
    /// No healthy endpoint (503, or a refused connection for TCP).
    NoHealthyEndpoint,
    /// The Service does not expose the port dialed.
    UnknownPort,
    /// The flow is bound to a waypoint that cannot be found.
    NoWaypoint,
}

/// Step 6: the verdict.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The outcome.
    pub outcome: Outcome,
    /// True when the flow reaches an application.
    pub allowed: bool,
    /// How the bytes travel.
    pub path: PathKind,
    /// The HTTP status the client gets from the mesh itself (403 at the waypoint, 404, 503...),
    /// when the mesh answers instead of the application.
    pub status: Option<u16>,
    /// The hop that decided a refusal (`waypoint demo/waypoint`, `ztunnel on node-1 for ...`).
    pub hop: Option<String>,
    /// The policy that decided a refusal.
    pub policy: Option<String>,
    /// The endpoints (`namespace/pod`) that can answer.
    pub backends: Vec<String>,
    /// One sentence.
    pub summary: String,
}
