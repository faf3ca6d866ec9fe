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
//!   `maxRetries` bounds the retries in flight.
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

/// The policy in force for one destination (Service port and subset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Load balancing.
    pub balance: Balance,
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
    }
    if let Some(pool) = &layer.connection_pool {
        base.pool = Pool {
            max_connections: pool.max_connections,
            http1_max_pending: pool.http1_max_pending_requests,
            http2_max_requests: pool.http2_max_requests,
            max_retries: pool.max_retries,
            h2_upgrade: pool.h2_upgrade,
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

    /// Whether one more retry may start for the destination: within `maxRetries` when set, and
    /// within the retry budget (retries in flight at most 20% of the requests in flight, and at
    /// least 3), so that retries cannot multiply load during an incident. Returns the guard that
    /// holds the retry's slot.
    pub fn admit_retry(&self, destination: &str, pool: &Pool) -> Option<InFlight> {
        let retries = Self::counter(&self.retries, destination);
        let requests = Self::counter(&self.destinations, destination).load(Ordering::Relaxed);
        let budget = (requests / 5).max(3);
        let limit = if pool.max_retries == 0 {
            budget
        } else {
            budget.min(pool.max_retries as usize)
        };
        let slot = enter(&retries);
        if retries.load(Ordering::Relaxed) > limit {
            return None;
        }
        Some(slot)
    }

    /// Chooses an endpoint of `service` port `port` for a request.
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
