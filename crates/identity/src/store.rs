//! Keeps a fresh certificate for every identity this process serves.
//!
//! Owns per-identity state and its refresh task: the first [`CertStore::get`] (or `subscribe`)
//! starts a fetch that concurrent callers share; a fetched certificate is replaced at its
//! half-life (with jitter); a failed fetch is retried with exponential backoff while the
//! still-valid certificate keeps being served. At most `max_concurrent_fetches` requests are at the
//! CA at once, and fetches someone is waiting for go before background refreshes. Each identity has
//! its own task, so one failing identity never holds up another.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::AbortHandle;

use crate::ca::{CaError, CertificateAuthority};
use crate::certificate::{CertificateError, WorkloadCertificate};
use crate::csr::{self, CsrError};
use crate::identity::Identity;

/// How long one CA request may take before it counts as a failed attempt.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Refreshes happen at half-life ± this fraction of the certificate's lifetime, so that
/// certificates issued together are not all renewed in the same instant.
const REFRESH_JITTER: f64 = 0.05;
/// Shortest time between two fetch attempts for one identity, even under demand.
const MIN_RETRY_GAP: Duration = Duration::from_millis(200);
/// Backoff delays vary by ± this fraction.
const BACKOFF_JITTER: f64 = 0.2;
/// Validity a [`CertificateAuthority`] source grants when no TTL is asked for.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A boxed future returned by [`CertificateSource`].
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, FetchError>> + Send + 'a>>;

/// Where certificates come from (ztunnel: the Istio CA over gRPC; tests: a CertificateAuthority).
pub trait CertificateSource: Send + Sync + 'static {
    /// Sends `csr_pem` for `identity` and returns the chain `[leaf, intermediates..., root(s)]`.
    fn fetch(&self, identity: &Identity, csr_pem: String) -> FetchFuture<'_>;

    /// As [`Self::fetch`], asking for a certificate valid for `ttl` (the store passes its
    /// configured TTL). Sources that cannot choose the validity keep the default, which ignores
    /// `ttl`.
    fn fetch_with_ttl(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> FetchFuture<'_> {
        let _ = ttl;
        self.fetch(identity, csr_pem)
    }
}

/// Why a [`CertificateSource`] returned no chain.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The CA could not be reached or did not answer.
    #[error("the certificate authority is unreachable: {0}")]
    Unavailable(String),
    /// The CA answered with a refusal.
    #[error("the certificate authority refused to sign: {0}")]
    Refused(String),
    /// An in-process [`CertificateAuthority`] refused.
    #[error("the local certificate authority refused to sign: {0}")]
    Local(#[source] CaError),
}

impl CertificateSource for CertificateAuthority {
    fn fetch(&self, identity: &Identity, csr_pem: String) -> FetchFuture<'_> {
        self.fetch_with_ttl(identity, csr_pem, DEFAULT_TTL)
    }

    fn fetch_with_ttl(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> FetchFuture<'_> {
        let result = self
            .sign_csr(&csr_pem, identity, ttl)
            .map_err(FetchError::Local);
        Box::pin(std::future::ready(result))
    }
}

/// Tuning of the store; `Default` gives ztunnel's values.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Validity to ask the CA for (ztunnel's `SECRET_TTL`, default 24 h).
    pub ttl: Duration,
    /// Most CA requests in flight at once (default 8; 0 counts as 1).
    pub max_concurrent_fetches: usize,
    /// First retry delay after a failed fetch (default 500 ms); doubles per failure.
    pub initial_backoff: Duration,
    /// Longest retry delay (default 150 s).
    pub max_backoff: Duration,
    /// Where each identity's fetch-and-refresh task runs; `None` (the default) spawns on the
    /// runtime of whoever first asks. ztunnel gives its control runtime, so certificate work
    /// never competes with traffic for the data path's threads.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            ttl: DEFAULT_TTL,
            max_concurrent_fetches: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            runtime: None,
        }
    }
}

/// Why the store has no certificate to give. Cheap to clone: every caller waiting on one fetch
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The CSR could not be made.
    #[error("cannot request a certificate for {identity}: {source}")]
    Csr {
        /// The identity.
        identity: Identity,
        /// Why.
        source: Arc<CsrError>,
    },
    /// The CA returned an error.
    #[error("no certificate for {identity}: {source}")]
    Fetch {
        /// The identity.
        identity: Identity,
        /// Why.
        source: Arc<FetchError>,
    },
    /// The CA did not answer in time.
    #[error(
        "no certificate for {identity}: the certificate authority did not answer within {timeout:?}"
    )]
    Timeout {
        /// The identity.
        identity: Identity,
        /// The limit.
        timeout: Duration,
    },
    /// The CA returned something we cannot use.
    #[error("the certificate authority returned an unusable chain for {identity}: {source}")]
    Chain {
        /// The identity.
        identity: Identity,
        /// Why.
        source: Arc<CertificateError>,
    },
    /// The CA issued for another identity.
    #[error(
        "the certificate authority issued a certificate for {issued} but {requested} was requested"
    )]
    WrongIdentity {
        /// What we asked for.
        requested: Identity,
        /// What the leaf says.
        issued: Identity,
    },
    /// The CA issued a certificate that has already expired.
    #[error(
        "the certificate authority issued an already expired certificate for {identity} \
         (not_after {not_after}); is the CA's or this node's clock wrong?"
    )]
    ExpiredOnArrival {
        /// The identity.
        identity: Identity,
        /// RFC 3339.
        not_after: String,
    },
    /// `forget` was called while the caller waited.
    #[error("the certificate of {identity} is no longer managed (it was forgotten)")]
    Forgotten {
        /// The identity.
        identity: Identity,
    },
}

/// What the store is doing for one identity, for `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertState {
    /// First fetch in progress; no certificate yet.
    Initializing,
    /// A valid certificate is held and no fetch is running.
    Available,
    /// A valid certificate is held and its replacement is being fetched.
    Refreshing,
    /// The last fetch failed; retrying with backoff. A still-valid certificate, if any, is
    /// still served (see `not_after`).
    Failing {
        /// The last failure.
        last_error: String,
        /// Consecutive failed attempts.
        failed_attempts: u32,
    },
}

/// One identity's certificate status (no keys), for `/config_dump`.
#[derive(Clone, Debug)]
pub struct CertStatus {
    /// The identity.
    pub identity: Identity,
    /// What the store is doing for it.
    pub state: CertState,
    /// Current certificate's start of validity.
    pub not_before: Option<SystemTime>,
    /// Current certificate's end of validity.
    pub not_after: Option<SystemTime>,
    /// Leaf + intermediates PEM.
    pub chain_pem: Vec<String>,
    /// Roots PEM.
    pub roots_pem: Vec<String>,
}

/// Certificates for every identity this process serves; cheap to clone (shared state).
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    config: StoreConfig,
    limiter: Arc<FetchLimiter>,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for entry in lock(&self.entries).values() {
            entry.stop();
        }
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("config", &self.inner.config)
            .field("identities", &lock(&self.inner.entries).len())
            .finish_non_exhaustive()
    }
}

/// Per-identity state shared by the refresh task and callers.
struct Entry {
    identity: Identity,
    state: watch::Sender<EntryState>,
    certs: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    /// Asks the task to fetch now (a caller found the certificate expired).
    wake: Notify,
    task: OnceLock<AbortHandle>,
}

#[derive(Default)]
struct EntryState {
    cert: Option<Arc<WorkloadCertificate>>,
    fetching: bool,
    last_error: Option<StoreError>,
    failed_attempts: u32,
    forgotten: bool,
}

impl Entry {
    fn stop(&self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }

    fn needs_certificate_now(&self) -> bool {
        self.state
            .borrow()
            .cert
            .as_ref()
            .is_none_or(|c| c.is_expired_at(SystemTime::now()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (single inserts/removes).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CertStore {
    /// A store fetching from `source`. Nothing is fetched until an identity is asked for.
    pub fn new(source: Arc<dyn CertificateSource>, config: StoreConfig) -> Self {
        let permits = config.max_concurrent_fetches.max(1);
        CertStore {
            inner: Arc::new(Inner {
                source,
                config,
                limiter: Arc::new(FetchLimiter::new(permits)),
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Waits for the first certificate for `identity` (starting a fetch if needed). Returns the
    /// last fetch error if no valid certificate exists and no fetch is in flight.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, StoreError> {
        let entry = self.entry(identity);
        let mut state = entry.state.subscribe();
        // A caller with no usable certificate asks for a fetch now rather than waiting out the
        // backoff (a pod's first connection must not fail because the CA refused a prefetch
        // made before it knew the pod); it reports the error of that fresh attempt.
        let mut requested = false;
        loop {
            {
                let current = state.borrow_and_update();
                if current.forgotten {
                    break;
                }
                if let Some(cert) = &current.cert
                    && !cert.is_expired_at(SystemTime::now())
                {
                    return Ok(cert.clone());
                }
                if !current.fetching {
                    if requested && let Some(error) = &current.last_error {
                        return Err(error.clone());
                    }
                    entry.wake.notify_one();
                    requested = true;
                }
            }
            if state.changed().await.is_err() {
                break;
            }
        }
        Err(StoreError::Forgotten {
            identity: identity.clone(),
        })
    }

    /// Latest certificate for `identity`, updated on every rotation (starts fetching if the
    /// identity is new). Must be called inside a tokio runtime.
    pub fn subscribe(
        &self,
        identity: &Identity,
    ) -> watch::Receiver<Option<Arc<WorkloadCertificate>>> {
        self.entry(identity).certs.subscribe()
    }

    /// Stop refreshing `identity` and drop its certificate.
    pub fn forget(&self, identity: &Identity) {
        let Some(entry) = lock(&self.inner.entries).remove(identity) else {
            return;
        };
        entry.stop();
        entry.state.send_modify(|s| {
            s.forgotten = true;
            s.cert = None;
        });
        entry.certs.send_replace(None);
    }

    /// Identity, state, validity and chain PEMs (no keys) of every managed identity, sorted by
    /// identity, for `/config_dump`.
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let entries: Vec<Arc<Entry>> = lock(&self.inner.entries).values().cloned().collect();
        let mut statuses: Vec<CertStatus> = entries.iter().map(|e| status_of(e)).collect();
        statuses.sort_by(|a, b| a.identity.cmp(&b.identity));
        statuses
    }

    fn entry(&self, identity: &Identity) -> Arc<Entry> {
        let mut entries = lock(&self.inner.entries);
        if let Some(entry) = entries.get(identity) {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            identity: identity.clone(),
            state: watch::Sender::new(EntryState {
                fetching: true,
                ..EntryState::default()
            }),
            certs: watch::Sender::new(None),
            wake: Notify::new(),
            task: OnceLock::new(),
        });
        let maintaining = maintain(
            entry.clone(),
            self.inner.source.clone(),
            self.inner.limiter.clone(),
            self.inner.config.clone(),
        );
        let task = match &self.inner.config.runtime {
            Some(runtime) => runtime.spawn(maintaining),
            None => tokio::spawn(maintaining),
        };
        // A fresh OnceLock: setting cannot fail.
        let _ = entry.task.set(task.abort_handle());
        entries.insert(identity.clone(), entry.clone());
        entry
    }
}

fn status_of(entry: &Entry) -> CertStatus {
    let state = entry.state.borrow();
    let cert = state.cert.as_ref();
    let phase = match (&state.last_error, state.fetching, cert) {
        (_, true, None) => CertState::Initializing,
        (Some(error), false, _) => CertState::Failing {
            last_error: error.to_string(),
            failed_attempts: state.failed_attempts,
        },
        (_, true, Some(_)) => CertState::Refreshing,
        (None, false, _) => CertState::Available,
    };
    CertStatus {
        identity: entry.identity.clone(),
        state: phase,
        not_before: cert.map(|c| c.not_before()),
        not_after: cert.map(|c| c.not_after()),
        chain_pem: cert.map(|c| c.chain_pem()).unwrap_or_default(),
        roots_pem: cert.map(|c| c.roots_pem()).unwrap_or_default(),
    }
}

/// The refresh task of one identity: fetch, publish, sleep until half-life (or backoff), repeat.
async fn maintain(
    entry: Arc<Entry>,
    source: Arc<dyn CertificateSource>,
    limiter: Arc<FetchLimiter>,
    config: StoreConfig,
) {
    let mut failures: u32 = 0;
    loop {
        let priority = if entry.needs_certificate_now() {
            Priority::Waited
        } else {
            Priority::Refresh
        };
        entry.state.send_modify(|s| s.fetching = true);
        let outcome = {
            let _permit = limiter.acquire(priority).await;
            fetch_once(source.as_ref(), &entry.identity, config.ttl).await
        };
        let delay = match outcome {
            Ok(cert) => {
                failures = 0;
                tracing::info!(
                    identity = %entry.identity,
                    not_after = %humantime::format_rfc3339_seconds(cert.not_after()),
                    "workload certificate issued",
                );
                let delay = refresh_delay(&cert, &config);
                entry.certs.send_replace(Some(cert.clone()));
                entry.state.send_modify(|s| {
                    s.cert = Some(cert);
                    s.fetching = false;
                    s.last_error = None;
                    s.failed_attempts = 0;
                });
                delay
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff_delay(&config, failures);
                tracing::warn!(
                    identity = %entry.identity,
                    attempt = failures,
                    retry_in = ?delay,
                    %error,
                    "certificate fetch failed; keeping the current certificate if still valid",
                );
                entry.state.send_modify(|s| {
                    s.fetching = false;
                    s.last_error = Some(error);
                    s.failed_attempts = failures;
                });
                delay
            }
        };
        // Demand may cut a backoff short, but never to less than this gap between attempts.
        tokio::time::sleep(MIN_RETRY_GAP.min(delay)).await;
        tokio::select! {
            () = tokio::time::sleep(delay.saturating_sub(MIN_RETRY_GAP)) => {}
            () = entry.wake.notified() => {}
        }
    }
}

async fn fetch_once(
    source: &dyn CertificateSource,
    identity: &Identity,
    ttl: Duration,
) -> Result<Arc<WorkloadCertificate>, StoreError> {
    let request = csr::generate(identity).map_err(|e| StoreError::Csr {
        identity: identity.clone(),
        source: Arc::new(e),
    })?;
    let chain = tokio::time::timeout(
        FETCH_TIMEOUT,
        source.fetch_with_ttl(identity, request.csr_pem, ttl),
    )
    .await
    .map_err(|_| StoreError::Timeout {
        identity: identity.clone(),
        timeout: FETCH_TIMEOUT,
    })?
    .map_err(|e| StoreError::Fetch {
        identity: identity.clone(),
        source: Arc::new(e),
    })?;
    let cert = WorkloadCertificate::new(&request.private_key_pem, &chain).map_err(|e| {
        StoreError::Chain {
            identity: identity.clone(),
            source: Arc::new(e),
        }
    })?;
    if cert.identity() != identity {
        return Err(StoreError::WrongIdentity {
            requested: identity.clone(),
            issued: cert.identity().clone(),
        });
    }
    if cert.is_expired_at(SystemTime::now()) {
        return Err(StoreError::ExpiredOnArrival {
            identity: identity.clone(),
            not_after: humantime::format_rfc3339_seconds(cert.not_after()).to_string(),
        });
    }
    Ok(Arc::new(cert))
}

/// Time until the next refresh: half-life ± jitter. If that moment has passed (e.g. the CA's
/// clock is behind ours), a quarter of the remaining validity, so a skewed CA cannot make us
/// spin.
fn refresh_delay(cert: &WorkloadCertificate, config: &StoreConfig) -> Duration {
    let now = SystemTime::now();
    let lifetime = cert
        .not_after()
        .duration_since(cert.not_before())
        .unwrap_or(Duration::ZERO);
    let fraction = 0.5 + rand::random_range(-REFRESH_JITTER..=REFRESH_JITTER);
    let target = cert.not_before() + lifetime.mul_f64(fraction);
    let until_target = target.duration_since(now).unwrap_or(Duration::ZERO);
    let remaining = cert
        .not_after()
        .duration_since(now)
        .unwrap_or(Duration::ZERO);
    until_target.max(remaining / 4).max(config.initial_backoff)
}

/// `initial * 2^(failures-1)`, capped, ± 20 % jitter, never above the cap.
fn backoff_delay(config: &StoreConfig, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    let base = config
        .initial_backoff
        .saturating_mul(1 << exponent)
        .min(config.max_backoff);
    base.mul_f64(rand::random_range(
        1.0 - BACKOFF_JITTER..=1.0 + BACKOFF_JITTER,
    ))
    .min(config.max_backoff)
}

/// Whether someone is waiting for the fetch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Priority {
    /// No valid certificate: a `get` caller (a connection) is waiting.
    Waited,
    /// Replacing a still-valid certificate.
    Refresh,
}

/// A counting semaphore whose waiters are served `Waited` first, then `Refresh`, FIFO within
/// each class.
#[derive(Debug)]
struct FetchLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    available: usize,
    waited: VecDeque<oneshot::Sender<Permit>>,
    refresh: VecDeque<oneshot::Sender<Permit>>,
}

/// One CA request slot; returned to the limiter on drop.
#[derive(Debug)]
struct Permit {
    limiter: Arc<FetchLimiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl FetchLimiter {
    fn new(permits: usize) -> Self {
        FetchLimiter {
            state: Mutex::new(LimiterState {
                available: permits,
                waited: VecDeque::new(),
                refresh: VecDeque::new(),
            }),
        }
    }

    async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        loop {
            let ticket = {
                let mut state = lock(&self.state);
                if state.available > 0 {
                    state.available -= 1;
                    return Permit {
                        limiter: self.clone(),
                    };
                }
                let (sender, ticket) = oneshot::channel();
                match priority {
                    Priority::Waited => state.waited.push_back(sender),
                    Priority::Refresh => state.refresh.push_back(sender),
                }
                ticket
            };
            // A sender is only dropped unsent if the limiter itself goes away; then retry.
            if let Ok(permit) = ticket.await {
                return permit;
            }
        }
    }

    /// Hands the slot to the next live waiter, or puts it back.
    fn release(self: &Arc<Self>) {
        let next = {
            let mut state = lock(&self.state);
            match state
                .waited
                .pop_front()
                .or_else(|| state.refresh.pop_front())
            {
                Some(next) => next,
                None => {
                    state.available += 1;
                    return;
                }
            }
        };
        // Outside the lock: if that waiter was cancelled, the permit comes back and its drop
        // releases it to the next one.
        let _ = next.send(Permit {
            limiter: self.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_initial_and_stays_under_the_cap() {
        let config = StoreConfig::default();
        for (failures, base_ms) in [(1, 500u64), (2, 1000), (3, 2000), (9, 128_000)] {
            let delay = backoff_delay(&config, failures);
            let base = Duration::from_millis(base_ms);
            assert!(
                delay >= base.mul_f64(0.8) && delay <= base.mul_f64(1.2),
                "attempt {failures}: {delay:?} not within 20% of {base:?}"
            );
        }
        for failures in [10, 20, 1000] {
            let delay = backoff_delay(&config, failures);
            assert!(delay <= config.max_backoff && delay >= config.max_backoff.mul_f64(0.8));
        }
    }

    #[tokio::test]
    async fn limiter_serves_waited_fetches_before_refreshes() {
        let limiter = Arc::new(FetchLimiter::new(1));
        let held = limiter.acquire(Priority::Refresh).await;
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("refresh-1", Priority::Refresh),
            ("waited-1", Priority::Waited),
            ("refresh-2", Priority::Refresh),
            ("waited-2", Priority::Waited),
        ] {
            let limiter = limiter.clone();
            let order_tx = order_tx.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = limiter.acquire(priority).await;
                order_tx.send(name).unwrap();
            }));
            // Let the task enqueue before the next one, so FIFO order within a class is defined.
            tokio::task::yield_now().await;
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(name) = order_rx.recv().await {
            order.push(name);
        }
        assert_eq!(order, ["waited-1", "waited-2", "refresh-1", "refresh-2"]);
        assert_eq!(lock(&limiter.state).available, 1);
    }
}
