//! Destination policies (Istio DestinationRule) as the waypoint applies them: subsets, load
//! balancing, connection-pool limits and outlier detection, plus the live per-endpoint state
//! they need (requests in flight, consecutive errors, ejections), which outlives configuration
//! updates.
//!
//! - **Policy resolution**: the DestinationRule's `trafficPolicy`, overridden field by field
//!   (load balancer, connection pool, outlier detection) by the `portLevelSettings` entry of the
//!   Service port, then by the subset's own policy.
//! - **Load balancing**: `LEAST_REQUEST` (Istio's default; two random choices, the one with fewer
//!   requests in flight), `ROUND_ROBIN`, `RANDOM`, and `consistentHash` on a header, cookie,
//!   query parameter or the source IP (rendezvous hashing, so adding or removing an endpoint
//!   moves only its share). Candidates are the Service's eligible endpoints (health, locality
//!   preferences: `ambit-state`), restricted to the subset and to endpoints not ejected.
//! - **Connection pool**: requests in flight to a destination (Service port and subset) are
//!   bounded by `http2MaxRequests` for HTTP/2 backends and by `maxConnections +
//!   http1MaxPendingRequests` for HTTP/1.1 ones (each request holds a connection there); beyond
//!   that the request is answered 503 with flag `UO` at once instead of queueing without bound.
//!   `maxRetries` bounds the retries in flight. `connectTimeout`, `maxRequestsPerConnection` and
//!   `idleTimeout` shape the destination's connections ([`crate::upstream::ConnLimits`]).
//! - **Outlier detection** (Envoy's semantics, simplified): a response of 500 or more, a reset or
//!   a failed connect counts towards `consecutive5xxErrors`; 502, 503, 504 and local failures
//!   count towards `consecutiveGatewayErrors`; any other response resets the counts. Reaching a
//!   threshold ejects the endpoint for `baseEjectionTime` times the number of its ejections,
//!   unless the share already ejected is `maxEjectionPercent` or more (checked before ejecting,
//!   so one endpoint of three can be ejected at the default 10%), or fewer than
//!   `minHealthPercent` of the endpoints are healthy (then nothing is ejected). The multiplier
//!   decreases by one for every `interval` the endpoint spends without an ejection.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_core::metrics::Registry;
use ambit_proto::waypoint as pb;
use ambit_state::{Service, StateIndex, Workload};
use rand::Rng;

/// Envoy's default outlier interval.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Envoy's default base ejection time.
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Envoy's default maximum ejection percent.
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// How endpoints are chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Balance {
    /// Two random choices, fewer requests in flight wins (Istio's default).
    #[default]
    LeastRequest,
    /// In turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// By a hash of the request's key.
    Hash(HashKey),
}

/// What a consistent hash is computed from.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// A request header (lower-case name).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The client's IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
}

/// Connection-pool limits (0: unlimited).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pool {
    /// `tcp.maxConnections`.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`.
    pub http1_max_pending: u32,
    /// `http.http2MaxRequests`.
    pub http2_max_requests: u32,
    /// `http.maxRetries`.
    pub max_retries: u32,
    /// `http.h2UpgradePolicy: UPGRADE`.
    pub h2_upgrade: bool,
    /// `tcp.connectTimeout`, `http.maxRequestsPerConnection` and `http.idleTimeout`: how the
    /// destination's connections are opened, reused and closed.
    pub connections: crate::upstream::ConnLimits,
}

/// Outlier detection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// `consecutive5xxErrors` (0: off).
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors` (0: off).
    pub consecutive_gateway: u32,
    /// `interval`.
    pub interval: Duration,
    /// `baseEjectionTime`.
    pub base_ejection: Duration,
    /// `maxEjectionPercent`.
    pub max_ejection_percent: u32,
    /// `minHealthPercent`.
    pub min_health_percent: u32,
}

/// DestinationRule `localityLbSetting` as the waypoint applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityLb {
    /// `enabled` (unset reads as true, Istio's mesh-wide default).
    pub enabled: bool,
    /// `failover`: (from region, to region), in the order written.
    pub failover: Vec<(String, String)>,
    /// `distribute`: the waypoint's locality pattern, then (endpoint locality pattern, percent).
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `failoverPriority`: the topology labels endpoints are ranked by, up to the first label
    /// that is not one of region, zone, subzone, node (`kubernetes.io/hostname`), cluster or
    /// network.
    pub failover_priority: Vec<ambit_state::PreferenceScope>,
}

impl Default for LocalityLb {
    /// Istio's default: enabled, no failover or distribute rules (locality priorities apply
    /// when outlier detection is configured).
    fn default() -> Self {
        Self {
            enabled: true,
            failover: Vec::new(),
            distribute: Vec::new(),
            failover_priority: Vec::new(),
        }
    }
}

/// The scope a `failoverPriority` label compares, if the waypoint knows it.
fn priority_scope(label: &str) -> Option<ambit_state::PreferenceScope> {
    use ambit_state::PreferenceScope as S;
    Some(match label {
        "topology.kubernetes.io/region" => S::Region,
        "topology.kubernetes.io/zone" => S::Zone,
        "topology.istio.io/subzone" => S::Subzone,
        "kubernetes.io/hostname" => S::Node,
        "topology.istio.io/cluster" => S::Cluster,
        "topology.istio.io/network" => S::Network,
        _ => return None,
    })
}

/// The policy in force for one destination (Service port and subset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Load balancing.
    pub balance: Balance,
    /// `loadBalancer.localityLbSetting`, when the DestinationRule sets one.
    pub locality: Option<LocalityLb>,
    /// Pool limits.
    pub pool: Pool,
    /// Outlier detection, when configured.
    pub outlier: Option<Outlier>,
}

fn duration(d: Option<&prost_types::Duration>, default: Duration) -> Duration {
    d.and_then(|d| Duration::try_from(*d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

/// A duration that is set and above zero.
fn positive(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
        .filter(|d| !d.is_zero())
}

/// Overrides `base` with whatever `layer` sets.
fn overlay(base: &mut Policy, layer: &pb::TrafficPolicy) {
    if let Some(lb) = &layer.load_balancer {
        base.balance = match (&lb.consistent_hash, lb.simple()) {
            (Some(hash), _) => match &hash.key {
                Some(pb::consistent_hash::Key::Header(h)) => {
                    Balance::Hash(HashKey::Header(h.to_ascii_lowercase()))
                }
                Some(pb::consistent_hash::Key::Cookie(c)) => {
                    Balance::Hash(HashKey::Cookie(c.clone()))
                }
                Some(pb::consistent_hash::Key::SourceIp(_)) => Balance::Hash(HashKey::SourceIp),
                Some(pb::consistent_hash::Key::QueryParameter(q)) => {
                    Balance::Hash(HashKey::QueryParameter(q.clone()))
                }
                None => Balance::LeastRequest,
            },
            (None, pb::load_balancer::Simple::RoundRobin) => Balance::RoundRobin,
            (None, pb::load_balancer::Simple::Random) => Balance::Random,
            (None, _) => Balance::LeastRequest,
        };
        // A layer's loadBalancer replaces the one below it whole, locality settings included.
        base.locality = lb.locality.as_ref().map(|l| {
            let mut distribute: Vec<(String, Vec<(String, u32)>)> = l
                .distribute
                .iter()
                .map(|d| {
                    let mut to: Vec<(String, u32)> =
                        d.to.iter().map(|(k, v)| (k.clone(), *v)).collect();
                    // Most specific pattern first, so an endpoint locality takes the weight of
                    // the pattern that names it most closely (the map has no order).
                    to.sort_by(|a, b| specificity(&b.0).cmp(&specificity(&a.0)).then(a.cmp(b)));
                    (d.from.clone(), to)
                })
                .collect();
            distribute.retain(|(_, to)| !to.is_empty());
            LocalityLb {
                enabled: l.enabled,
                failover: l
                    .failover
                    .iter()
                    .map(|f| (f.from.clone(), f.to.clone()))
                    .collect(),
                distribute,
                failover_priority: l
                    .failover_priority
                    .iter()
                    .map_while(|label| priority_scope(label))
                    .collect(),
            }
        });
    }
    if let Some(pool) = &layer.connection_pool {
        base.pool = Pool {
            max_connections: pool.max_connections,
            http1_max_pending: pool.http1_max_pending_requests,
            http2_max_requests: pool.http2_max_requests,
            max_retries: pool.max_retries,
            h2_upgrade: pool.h2_upgrade,
            connections: crate::upstream::ConnLimits {
                connect_timeout: positive(pool.connect_timeout.as_ref()),
                max_requests_per_connection: pool.max_requests_per_connection,
                idle_timeout: positive(pool.idle_timeout.as_ref()),
            },
        };
    }
    if let Some(o) = &layer.outlier_detection
        && o.enabled
    {
        base.outlier = Some(Outlier {
            consecutive_5xx: o.consecutive_5xx_errors,
            consecutive_gateway: o.consecutive_gateway_errors,
            interval: duration(o.interval.as_ref(), DEFAULT_INTERVAL),
            base_ejection: duration(o.base_ejection_time.as_ref(), DEFAULT_BASE_EJECTION),
            max_ejection_percent: if o.max_ejection_percent == 0 {
                DEFAULT_MAX_EJECTION_PERCENT
            } else {
                o.max_ejection_percent.min(100)
            },
            min_health_percent: o.min_health_percent.min(100),
        });
    }
}

/// One DestinationRule, ready to resolve.
#[derive(Debug)]
struct Compiled {
    name: String,
    base: Option<pb::TrafficPolicy>,
    ports: HashMap<u16, pb::TrafficPolicy>,
    subsets: HashMap<String, (HashSet<String>, Option<pb::TrafficPolicy>)>,
}

/// Every destination policy, by Service (`<ns>/<hostname>`).
#[derive(Debug, Default)]
pub struct Destinations {
    by_service: HashMap<String, Compiled>,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChooseError {
    /// The subset is not defined by a DestinationRule of the Service.
    UnknownSubset {
        /// The Service.
        service: String,
        /// The subset named.
        subset: String,
    },
    /// No eligible endpoint (none healthy, none in the subset, or all ejected).
    NoEndpoint,
}

impl Destinations {
    /// Compiles `policies` (later ones for the same Service win; the control plane sends one).
    pub fn build<'a>(policies: impl IntoIterator<Item = &'a pb::DestinationPolicy>) -> Self {
        let mut by_service = HashMap::new();
        for p in policies {
            by_service.insert(
                p.service.clone(),
                Compiled {
                    name: p.resource_name(),
                    base: p.traffic_policy.clone(),
                    ports: p
                        .port_level
                        .iter()
                        .filter_map(|l| {
                            Some((u16::try_from(l.port).ok()?, l.traffic_policy.clone()?))
                        })
                        .collect(),
                    subsets: p
                        .subsets
                        .iter()
                        .map(|s| {
                            (
                                s.name.clone(),
                                (
                                    s.workloads.iter().cloned().collect(),
                                    s.traffic_policy.clone(),
                                ),
                            )
                        })
                        .collect(),
                },
            );
        }
        Self { by_service }
    }

    /// The DestinationRule (`ns/name`) that applies to `service`, if any.
    pub fn rule_of(&self, service: &str) -> Option<&str> {
        self.by_service.get(service).map(|c| c.name.as_str())
    }

    /// The policy for `service` port `port`, subset `subset`.
    pub fn policy(&self, service: &str, port: u16, subset: Option<&str>) -> Policy {
        let mut policy = Policy::default();
        let Some(c) = self.by_service.get(service) else {
            return policy;
        };
        if let Some(base) = &c.base {
            overlay(&mut policy, base);
        }
        if let Some(level) = c.ports.get(&port) {
            overlay(&mut policy, level);
        }
        if let Some((_, Some(own))) = subset.and_then(|s| c.subsets.get(s)) {
            overlay(&mut policy, own);
        }
        policy
    }

    /// The workload uids of `subset`, or why it does not exist.
    pub fn subset(&self, service: &str, subset: &str) -> Result<&HashSet<String>, ChooseError> {
        self.by_service
            .get(service)
            .and_then(|c| c.subsets.get(subset))
            .map(|(members, _)| members)
            .ok_or_else(|| ChooseError::UnknownSubset {
                service: service.to_string(),
                subset: subset.to_string(),
            })
    }
}

#[derive(Debug, Default)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    last_ejection: Option<Instant>,
}

/// Requests in flight to one endpoint; decremented when the guard is dropped.
#[derive(Debug)]
pub struct InFlight {
    counter: Arc<AtomicUsize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
    counter.fetch_add(1, Ordering::Relaxed);
    InFlight {
        counter: counter.clone(),
    }
}

/// A slot of a destination's connection pool, held while the request is in flight.
#[derive(Debug)]
pub struct Admitted {
    _request: InFlight,
}

/// A chosen endpoint.
#[derive(Debug)]
pub struct Chosen {
    /// The pod.
    pub workload: Arc<Workload>,
    /// Its port.
    pub port: u16,
    /// Counts the request against the endpoint until dropped.
    pub in_flight: InFlight,
}

/// An endpoint of a Service: (Service key, workload uid).
type EndpointKey = (Arc<str>, Arc<str>);

/// The live state of every destination and endpoint.
#[derive(Debug)]
pub struct TrafficState {
    endpoints: Mutex<HashMap<EndpointKey, EndpointHealth>>,
    in_flight: Mutex<HashMap<Arc<str>, Arc<AtomicUsize>>>,
    destinations: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    retries: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    round_robin: AtomicU64,
    registry: Registry,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a try ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response with this status.
    Status(u16),
    /// The connection or stream failed (connect failure, reset, timeout).
    LocalFailure,
}

impl TrafficState {
    /// Empty state, counting ejections into `registry`.
    pub fn new(registry: Registry) -> Self {
        registry.describe_counter(
            "ambit_waypoint_outlier_ejections_total",
            "Endpoints ejected by outlier detection, by destination service",
        );
        registry.describe_gauge(
            "ambit_waypoint_ejected_endpoints",
            "Endpoints currently ejected by outlier detection, by destination service",
        );
        registry.describe_counter(
            "ambit_waypoint_overflow_total",
            "Requests refused with 503 UO because a connection-pool limit was reached",
        );
        Self {
            endpoints: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            destinations: Mutex::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
            round_robin: AtomicU64::new(0),
            registry,
        }
    }

    fn counter(map: &Mutex<HashMap<String, Arc<AtomicUsize>>>, key: &str) -> Arc<AtomicUsize> {
        lock(map).entry(key.to_string()).or_default().clone()
    }

    /// Takes a slot of the destination's pool, or `None` when it is full (answer 503 `UO`).
    pub fn admit(&self, destination: &str, pool: &Pool, http2: bool) -> Option<Admitted> {
        let limit = if http2 {
            pool.http2_max_requests
        } else if pool.max_connections == 0 {
            0
        } else {
            pool.max_connections.saturating_add(pool.http1_max_pending)
        };
        let counter = Self::counter(&self.destinations, destination);
        let slot = enter(&counter);
        if limit != 0 && counter.load(Ordering::Relaxed) > limit as usize {
            drop(slot);
            self.registry
                .counter(
                    "ambit_waypoint_overflow_total",
                    &[("destination", destination.to_string())],
                )
                .increment(1);
            return None;
        }
        Some(Admitted { _request: slot })
    }

    /// Whether one more retry may start for the destination: within the DestinationRule's
    /// `maxRetries` when set (the operator's own bound, as in Istio), otherwise within the retry
    /// budget (retries in flight at most 20% of the requests in flight, and at least 3: Envoy's
    /// retry-budget defaults), so that retries cannot multiply load during an incident. Returns
    /// the guard that holds the retry's slot.
    pub fn admit_retry(&self, destination: &str, pool: &Pool) -> Option<InFlight> {
        let retries = Self::counter(&self.retries, destination);
        let limit = if pool.max_retries == 0 {
            let requests = Self::counter(&self.destinations, destination).load(Ordering::Relaxed);
            (requests / 5).max(3)
        } else {
            pool.max_retries as usize
        };
        let slot = enter(&retries);
        if retries.load(Ordering::Relaxed) > limit {
            return None;
        }
        Some(slot)
    }

    /// Chooses an endpoint of `service` port `port` for a request: among the Service's eligible
    /// endpoints (`ambit-state`: health, the Service's routing preferences relative to
    /// `source`), in the subset, not ejected (unless all are), in the locality `local` (the
    /// waypoint's own workload) prefers ([`prefer_locality`]), other than `avoid` (the previous
    /// try's) when there is another, by the policy's balancer.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &self,
        index: &StateIndex,
        destinations: &Destinations,
        service: &Service,
        port: u16,
        subset: Option<&str>,
        source: Option<&Workload>,
        policy: &Policy,
        hash: Option<u64>,
        avoid: Option<&str>,
        local: Option<&Workload>,
    ) -> Result<Chosen, ChooseError> {
        let members = subset
            .map(|s| destinations.subset(&service.key, s))
            .transpose()?;
        let now = Instant::now();
        let ejected: HashSet<Arc<str>> = match &policy.outlier {
            Some(_) => lock(&self.endpoints)
                .iter()
                .filter(|((svc, _), h)| {
                    **svc == *service.key && h.ejected_until.is_some_and(|t| t > now)
                })
                .map(|((_, uid), _)| uid.clone())
                .collect(),
            None => HashSet::new(),
        };
        let in_subset = |w: &Workload| members.is_none_or(|m| m.contains(&*w.uid));
        let keep = |w: &Workload| in_subset(w) && !ejected.contains(&w.uid);
        let mut candidates = index.candidates(service, port, source, &keep);
        if candidates.is_empty() && !ejected.is_empty() {
            // Everything left is ejected: Envoy's panic mode uses them all rather than none.
            candidates = index.candidates(service, port, source, &in_subset);
        }
        if let Some(local) = local {
            let mut roll = |total: u64| rand::rng().random_range(0..total.max(1));
            candidates = prefer_locality(candidates, policy, local, &mut roll);
        }
        if candidates.len() > 1
            && let Some(avoid) = avoid
        {
            candidates.retain(|(w, _)| &*w.uid != avoid);
        }
        if candidates.is_empty() {
            return Err(ChooseError::NoEndpoint);
        }
        let pick = match (&policy.balance, hash) {
            (Balance::Hash(_), Some(key)) => rendezvous(&candidates, key),
            (Balance::RoundRobin, _) => {
                let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
                usize::try_from(turn % candidates.len() as u64).unwrap_or(0)
            }
            (Balance::Random, _) | (Balance::Hash(_), None) => {
                rand::rng().random_range(0..candidates.len())
            }
            (Balance::LeastRequest, _) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let b = rng.random_range(0..candidates.len());
                if self.load(&candidates[b].0.uid) < self.load(&candidates[a].0.uid) {
                    b
                } else {
                    a
                }
            }
        };
        let (workload, port) = candidates.swap_remove(pick);
        let counter = lock(&self.in_flight)
            .entry(workload.uid.clone())
            .or_default()
            .clone();
        Ok(Chosen {
            in_flight: enter(&counter),
            workload,
            port,
        })
    }

    fn load(&self, uid: &str) -> usize {
        lock(&self.in_flight)
            .get(uid)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Records how a try to `workload` of `service` ended; may eject it.
    pub fn report(
        &self,
        index: &StateIndex,
        service: &Service,
        port: u16,
        workload: &Workload,
        policy: &Policy,
        outcome: TryOutcome,
    ) {
        let Some(outlier) = &policy.outlier else {
            return;
        };
        let (is_5xx, is_gateway) = match outcome {
            TryOutcome::LocalFailure => (true, true),
            TryOutcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
        };
        let now = Instant::now();
        let mut endpoints = lock(&self.endpoints);
        let key = (service.key.clone(), workload.uid.clone());
        let health = endpoints.entry(key.clone()).or_default();
        if !is_5xx {
            health.consecutive_5xx = 0;
        } else {
            health.consecutive_5xx += 1;
        }
        if !is_gateway {
            health.consecutive_gateway = 0;
        } else {
            health.consecutive_gateway += 1;
        }
        let tripped = (outlier.consecutive_5xx > 0
            && health.consecutive_5xx >= outlier.consecutive_5xx)
            || (outlier.consecutive_gateway > 0
                && health.consecutive_gateway >= outlier.consecutive_gateway);
        if !tripped || health.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        // May we eject one more? Count the Service's endpoints and those ejected now.
        let total = index.candidates(service, port, None, &|_| true).len().max(
            endpoints
                .keys()
                .filter(|(svc, _)| **svc == *service.key)
                .count(),
        );
        let ejected = endpoints
            .iter()
            .filter(|((svc, _), h)| {
                **svc == *service.key && h.ejected_until.is_some_and(|t| t > now)
            })
            .count();
        let total = total.max(1);
        if ejected * 100 / total >= outlier.max_ejection_percent as usize {
            return;
        }
        if (total - ejected) * 100 / total < outlier.min_health_percent as usize {
            return;
        }
        let Some(health) = endpoints.get_mut(&key) else {
            return;
        };
        // The multiplier decays by one per interval spent without an ejection.
        if let Some(last) = health.last_ejection {
            let quiet = now.saturating_duration_since(last).as_secs_f64()
                / outlier.interval.as_secs_f64().max(0.001);
            health.ejections = health.ejections.saturating_sub(quiet as u32);
        }
        health.ejections += 1;
        health.last_ejection = Some(now);
        health.ejected_until = Some(now + outlier.base_ejection * health.ejections);
        health.consecutive_5xx = 0;
        health.consecutive_gateway = 0;
        let labels = [("destination_service", service.hostname.to_string())];
        self.registry
            .counter("ambit_waypoint_outlier_ejections_total", &labels)
            .increment(1);
        tracing::warn!(
            service = %service.hostname,
            workload = %workload.name,
            until = ?outlier.base_ejection * health.ejections,
            "outlier detection ejected an endpoint"
        );
    }

    /// The endpoints ejected now, as (service key, workload uid, seconds left); refreshes the
    /// gauge.
    pub fn ejected(&self) -> Vec<(String, String, u64)> {
        let now = Instant::now();
        let endpoints = lock(&self.endpoints);
        let list: Vec<(String, String, u64)> = endpoints
            .iter()
            .filter_map(|((svc, uid), h)| {
                let until = h.ejected_until.filter(|t| *t > now)?;
                Some((
                    svc.to_string(),
                    uid.to_string(),
                    until.saturating_duration_since(now).as_secs(),
                ))
            })
            .collect();
        let mut per_service: HashMap<String, f64> = endpoints
            .keys()
            .map(|(svc, _)| (svc.to_string(), 0.0))
            .collect();
        for (svc, _, _) in &list {
            *per_service.entry(svc.clone()).or_default() += 1.0;
        }
        for (svc, count) in per_service {
            let host = svc
                .split_once('/')
                .map_or(svc.as_str(), |(_, h)| h)
                .to_string();
            self.registry
                .gauge(
                    "ambit_waypoint_ejected_endpoints",
                    &[("destination_service", host)],
                )
                .set(count);
        }
        list
    }
}

/// How many segments of a locality pattern (`region/zone/subzone`, `*` for any) are named.
fn specificity(pattern: &str) -> usize {
    pattern
        .split('/')
        .take_while(|s| *s != "*" && !s.is_empty())
        .count()
}

/// Whether `workload`'s locality matches `pattern` (`region`, `region/zone`,
/// `region/zone/subzone`, each part possibly `*`, which matches the rest). A workload without a
/// locality is in the empty region, zone and subzone.
pub fn locality_matches(pattern: &str, workload: &Workload) -> bool {
    let locality = workload.locality.as_deref();
    let parts = [
        locality.map_or("", |l| &*l.region),
        locality.map_or("", |l| &*l.zone),
        locality.map_or("", |l| &*l.subzone),
    ];
    for (i, segment) in pattern.split('/').enumerate() {
        if segment == "*" {
            return true;
        }
        match parts.get(i) {
            Some(part) if *part == segment => {}
            _ => return false,
        }
    }
    true
}

/// Region, zone and subzone.
type LocalityKey = (Arc<str>, Arc<str>, Arc<str>);

fn locality_key(w: &Workload) -> LocalityKey {
    match w.locality.as_deref() {
        Some(l) => (l.region.clone(), l.zone.clone(), l.subzone.clone()),
        None => (Arc::from(""), Arc::from(""), Arc::from("")),
    }
}

/// Narrows `candidates` (eligible endpoints, ejected ones already left out) to those the
/// DestinationRule's locality load balancing sends to, from the waypoint's own workload `local`
/// (its locality is its node's `topology.kubernetes.io/region`/`zone` and
/// `topology.istio.io/subzone`, as the workload API carries them):
///
/// - **distribute** (applies with or without outlier detection): the first entry whose `from`
///   matches `local` gives each endpoint locality the weight of the most specific `to` pattern
///   matching it, shared equally by the localities that pattern matches; one locality is drawn
///   by weight (`roll(total)` draws in `0..total`). Localities no pattern matches get nothing;
///   when no candidate matches any pattern, every candidate stays (rather than none).
/// - **failover priorities** (only with outlier detection, as in Istio, since it is what takes
///   failed endpoints out): priority 0 is the same region, zone and subzone as `local`, 1 the
///   same zone, 2 the same region, then other regions: with `failover` entries whose `from` is
///   the local region, their `to` regions in the order written, then the rest; without, all other
///   regions together. Only the best priority that has a candidate is kept, so traffic fails
///   over when (and only when) the local priority has no healthy endpoint left.
/// - **failoverPriority** (instead of the priorities above, with outlier detection): endpoints
///   sharing more of the listed topology labels (in order) with the waypoint come first.
///
/// `enabled: false` turns both off. The ranking is `ambit_state::shared_scopes`, the same one a
/// Service's routing preferences use.
pub fn prefer_locality(
    mut candidates: Vec<(Arc<Workload>, u16)>,
    policy: &Policy,
    local: &Workload,
    roll: &mut dyn FnMut(u64) -> u64,
) -> Vec<(Arc<Workload>, u16)> {
    let default = LocalityLb::default();
    let setting = policy.locality.as_ref().unwrap_or(&default);
    if !setting.enabled || candidates.len() < 2 {
        return candidates;
    }
    if let Some((_, to)) = setting
        .distribute
        .iter()
        .find(|(from, _)| locality_matches(from, local))
    {
        // Localities present, each with the pattern that claims it.
        let mut groups: Vec<(LocalityKey, usize)> = Vec::new();
        for (w, _) in &candidates {
            let key = locality_key(w);
            if groups.iter().any(|(k, _)| *k == key) {
                continue;
            }
            if let Some(i) = to.iter().position(|(p, _)| locality_matches(p, w)) {
                groups.push((key, i));
            }
        }
        // Weights in millionths of a percent: pattern weight shared by its localities.
        let weights: Vec<u64> = groups
            .iter()
            .map(|(_, i)| {
                let sharing = groups.iter().filter(|(_, j)| j == i).count().max(1) as u64;
                u64::from(to[*i].1) * 1_000_000 / sharing
            })
            .collect();
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return candidates;
        }
        let mut point = roll(total);
        let mut chosen = None;
        for (group, weight) in groups.iter().zip(&weights) {
            if point < *weight {
                chosen = Some(group.0.clone());
                break;
            }
            point -= weight;
        }
        if let Some(key) = chosen {
            candidates.retain(|(w, _)| locality_key(w) == key);
        }
        return candidates;
    }
    if policy.outlier.is_none() {
        return candidates;
    }
    if !setting.failover_priority.is_empty() {
        // Ranked by how many of the labels, in order, the endpoint shares with the waypoint.
        let scopes = &setting.failover_priority;
        let shared = |w: &Workload| ambit_state::shared_scopes(scopes, local, w);
        if let Some(best) = candidates.iter().map(|(w, _)| shared(w)).max() {
            candidates.retain(|(w, _)| shared(w) == best);
        }
        return candidates;
    }
    use ambit_state::PreferenceScope as S;
    let region = local.locality.as_deref().map_or("", |l| &*l.region);
    let targets: Vec<&str> = setting
        .failover
        .iter()
        .filter(|(from, _)| from == region)
        .map(|(_, to)| to.as_str())
        .collect();
    let priority = |w: &Workload| -> usize {
        match ambit_state::shared_scopes(&[S::Region, S::Zone, S::Subzone], local, w) {
            shared @ 1..=3 => 3 - shared,
            _ => {
                let theirs = w.locality.as_deref().map_or("", |l| &*l.region);
                3 + targets
                    .iter()
                    .position(|t| *t == theirs)
                    .unwrap_or(targets.len())
            }
        }
    };
    if let Some(best) = candidates.iter().map(|(w, _)| priority(w)).min() {
        candidates.retain(|(w, _)| priority(w) == best);
    }
    candidates
}

/// The candidate with the highest hash of (key, uid): stable as endpoints come and go.
fn rendezvous(candidates: &[(Arc<Workload>, u16)], key: u64) -> usize {
    candidates
        .iter()
        .enumerate()
        .max_by_key(|(_, (w, _))| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            w.uid.hash(&mut h);
            h.finish()
        })
        .map_or(0, |(i, _)| i)
}

/// The hash key of a request for `key`, when the request carries it.
pub fn hash_of(
    key: &HashKey,
    headers: &http::HeaderMap,
    query: Option<&str>,
    source: std::net::IpAddr,
) -> Option<u64> {
    let text: String = match key {
        HashKey::Header(name) => headers.get(name.as_str())?.to_str().ok()?.to_string(),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.to_string())
            })?,
        HashKey::SourceIp => source.to_string(),
        HashKey::QueryParameter(name) => query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_string())
        })?,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_proto::workload as wl;
    use ambit_state::Addresses;
    use std::collections::BTreeMap;

    const SVC: &str = "demo/shop.demo.svc.cluster.local";

    fn workload(name: &str, ip: [u8; 4], locality: (&str, &str, &str)) -> (String, wl::Address) {
        let uid = format!("Kubernetes//Pod/demo/{name}");
        let services = if name == "waypoint" {
            Default::default()
        } else {
            [(
                SVC.to_string(),
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into_iter()
            .collect()
        };
        let w = wl::Workload {
            uid: uid.clone(),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            services,
            locality: Some(wl::Locality {
                region: locality.0.into(),
                zone: locality.1.into(),
                subzone: locality.2.into(),
            }),
            ..Default::default()
        };
        (
            uid,
            wl::Address {
                r#type: Some(wl::address::Type::Workload(w)),
            },
        )
    }

    /// A Service with endpoints in four localities, and the waypoint in us-east/a.
    fn state() -> Addresses {
        let svc = wl::Service {
            name: "shop".into(),
            namespace: "demo".into(),
            hostname: "shop.demo.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
                length: None,
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        };
        let state = Addresses::new("node-1");
        let rejected = state.apply(
            &[
                (
                    svc.resource_name(),
                    wl::Address {
                        r#type: Some(wl::address::Type::Service(svc)),
                    },
                ),
                workload("waypoint", [10, 0, 0, 1], ("us-east", "a", "")),
                workload("same-zone", [10, 0, 1, 1], ("us-east", "a", "")),
                workload("same-region", [10, 0, 1, 2], ("us-east", "b", "")),
                workload("us-west", [10, 0, 1, 3], ("us-west", "a", "")),
                workload("eu", [10, 0, 1, 4], ("eu", "a", "")),
            ],
            &[],
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        state
    }

    fn policy(locality: Option<pb::LocalityLb>, outlier: bool) -> Vec<pb::DestinationPolicy> {
        vec![pb::DestinationPolicy {
            namespace: "demo".into(),
            name: "shop".into(),
            service: SVC.into(),
            traffic_policy: Some(pb::TrafficPolicy {
                load_balancer: Some(pb::LoadBalancer {
                    locality,
                    ..Default::default()
                }),
                outlier_detection: outlier.then(|| pb::OutlierDetection {
                    consecutive_5xx_errors: 1,
                    max_ejection_percent: 100,
                    enabled: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]
    }

    /// Who answers `n` requests, by pod name.
    fn draw(
        state: &Addresses,
        traffic: &TrafficState,
        rules: &Destinations,
        n: usize,
    ) -> BTreeMap<String, usize> {
        let index = state.index();
        let service = index.service(SVC).expect("service").clone();
        let local = index
            .workload_by_ip("", [10, 0, 0, 1].into())
            .expect("the waypoint's workload")
            .clone();
        let policy = rules.policy(SVC, 80, None);
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let chosen = traffic
                .choose(
                    &index,
                    rules,
                    &service,
                    80,
                    None,
                    None,
                    &policy,
                    None,
                    None,
                    Some(&local),
                )
                .expect("an endpoint");
            *seen.entry(chosen.workload.name.to_string()).or_default() += 1;
        }
        seen
    }

    fn eject(state: &Addresses, traffic: &TrafficState, rules: &Destinations, name: &str) {
        let index = state.index();
        let service = index.service(SVC).expect("service").clone();
        let uid = format!("Kubernetes//Pod/demo/{name}");
        let workload = index.workload(&uid).expect("workload").clone();
        let policy = rules.policy(SVC, 80, None);
        traffic.report(
            &index,
            &service,
            80,
            &workload,
            &policy,
            TryOutcome::Status(503),
        );
    }

    fn only(seen: &BTreeMap<String, usize>, name: &str) {
        assert_eq!(seen.keys().collect::<Vec<_>>(), vec![name], "{seen:?}");
    }

    #[test]
    fn with_outlier_detection_the_local_zone_is_preferred_then_failover_regions_in_order() {
        let state = state();
        let traffic = TrafficState::new(Registry::new());
        let rules = Destinations::build(&policy(
            Some(pb::LocalityLb {
                failover: vec![pb::locality_lb::Failover {
                    from: "us-east".into(),
                    to: "eu".into(),
                }],
                enabled: true,
                ..Default::default()
            }),
            true,
        ));
        only(&draw(&state, &traffic, &rules, 40), "same-zone");
        eject(&state, &traffic, &rules, "same-zone");
        only(&draw(&state, &traffic, &rules, 40), "same-region");
        eject(&state, &traffic, &rules, "same-region");
        // The failover target region before any other region.
        only(&draw(&state, &traffic, &rules, 40), "eu");
        eject(&state, &traffic, &rules, "eu");
        only(&draw(&state, &traffic, &rules, 40), "us-west");
    }

    #[test]
    fn istio_default_prefers_locality_only_with_outlier_detection() {
        let state = state();
        let traffic = TrafficState::new(Registry::new());
        // No localityLbSetting, outlier detection set: the local zone.
        let rules = Destinations::build(&policy(None, true));
        only(&draw(&state, &traffic, &rules, 40), "same-zone");
        // Without failover rules every other region is one priority: with the zone and the
        // region gone, both remote regions take traffic.
        eject(&state, &traffic, &rules, "same-zone");
        eject(&state, &traffic, &rules, "same-region");
        let seen = draw(&state, &traffic, &rules, 200);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec!["eu", "us-west"],
            "{seen:?}"
        );

        // No outlier detection: no locality preference at all.
        let traffic = TrafficState::new(Registry::new());
        let rules = Destinations::build(&policy(None, false));
        assert_eq!(draw(&state, &traffic, &rules, 400).len(), 4);
        // enabled: false turns it off even with outlier detection.
        let rules = Destinations::build(&policy(
            Some(pb::LocalityLb {
                enabled: false,
                ..Default::default()
            }),
            true,
        ));
        assert_eq!(draw(&state, &traffic, &rules, 400).len(), 4);
    }

    #[test]
    fn distribute_weights_localities_from_the_waypoints_own() {
        let state = state();
        let traffic = TrafficState::new(Registry::new());
        let rules = Destinations::build(&policy(
            Some(pb::LocalityLb {
                distribute: vec![
                    pb::locality_lb::Distribute {
                        from: "eu/*".into(),
                        to: [("eu/*".to_string(), 100)].into_iter().collect(),
                    },
                    pb::locality_lb::Distribute {
                        from: "us-east/a/*".into(),
                        to: [
                            ("us-east/a/*".to_string(), 80),
                            ("us-west/*".to_string(), 20),
                        ]
                        .into_iter()
                        .collect(),
                    },
                ],
                enabled: true,
                ..Default::default()
            }),
            false,
        ));
        let seen = draw(&state, &traffic, &rules, 1000);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec!["same-zone", "us-west"],
            "{seen:?}"
        );
        // Binomial(1000, 0.8): outside [720, 880] with probability below 1e-9.
        let local = seen["same-zone"];
        assert!((720..=880).contains(&local), "{seen:?}");
    }

    #[test]
    fn failover_priority_ranks_by_the_listed_labels() {
        let state = state();
        let traffic = TrafficState::new(Registry::new());
        let rules = Destinations::build(&policy(
            Some(pb::LocalityLb {
                failover_priority: vec![
                    "topology.kubernetes.io/region".into(),
                    "topology.kubernetes.io/zone".into(),
                ],
                enabled: true,
                ..Default::default()
            }),
            true,
        ));
        only(&draw(&state, &traffic, &rules, 40), "same-zone");
        eject(&state, &traffic, &rules, "same-zone");
        only(&draw(&state, &traffic, &rules, 40), "same-region");
        eject(&state, &traffic, &rules, "same-region");
        let seen = draw(&state, &traffic, &rules, 200);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec!["eu", "us-west"],
            "{seen:?}"
        );
    }

    /// Without `maxRetries` the retry budget bounds retries in flight (20% of requests in
    /// flight, at least 3); an operator's `maxRetries` replaces it, as in Istio.
    #[test]
    fn retries_in_flight_are_bounded_by_the_budget_or_max_retries() {
        let traffic = TrafficState::new(Registry::new());
        let admitted = |pool: &Pool| {
            let held: Vec<InFlight> = (0..100)
                .map_while(|_| traffic.admit_retry("echo", pool))
                .collect();
            held.len()
        };
        assert_eq!(admitted(&Pool::default()), 3, "the budget's floor");
        let requests: Vec<Admitted> = (0..40)
            .filter_map(|_| traffic.admit("echo", &Pool::default(), false))
            .collect();
        assert_eq!(requests.len(), 40);
        assert_eq!(admitted(&Pool::default()), 8, "20% of 40 in flight");
        let operator = Pool {
            max_retries: 25,
            ..Pool::default()
        };
        assert_eq!(admitted(&operator), 25, "maxRetries, not the budget");
    }

    #[test]
    fn locality_patterns() {
        let state = state();
        let index = state.index();
        let w = index
            .workload_by_ip("", [10, 0, 1, 2].into())
            .expect("workload")
            .clone();
        for (pattern, expected) in [
            ("us-east", true),
            ("us-east/*", true),
            ("us-east/b", true),
            ("us-east/b/*", true),
            ("us-east/a", false),
            ("*", true),
            ("us-west/*", false),
            ("us-east/b/rack-1", false),
        ] {
            assert_eq!(locality_matches(pattern, &w), expected, "{pattern}");
        }
    }
}
