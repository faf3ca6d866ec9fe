//! The certificate store under tokio's paused clock, with a real CA behind a source that can be
//! told to fail.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{
    CertState, CertStore, CertificateSource, FetchError, FetchFuture, StoreConfig,
};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// A real CA that counts requests per identity, fails for identities in `failing`, and takes
/// `latency` (virtual time) per request.
struct FlakySource {
    ca: CertificateAuthority,
    failing: Mutex<HashSet<Identity>>,
    attempts: Mutex<HashMap<Identity, u32>>,
    latency: Duration,
}

impl FlakySource {
    fn new(latency: Duration) -> Arc<Self> {
        Arc::new(FlakySource {
            ca: CertificateAuthority::generate_root("cluster.local", 24 * 365 * HOUR).unwrap(),
            failing: Mutex::new(HashSet::new()),
            attempts: Mutex::new(HashMap::new()),
            latency,
        })
    }

    fn set_failing(&self, identity: &Identity, failing: bool) {
        let mut set = self.failing.lock().unwrap();
        if failing {
            set.insert(identity.clone());
        } else {
            set.remove(identity);
        }
    }

    fn attempts(&self, identity: &Identity) -> u32 {
        self.attempts
            .lock()
            .unwrap()
            .get(identity)
            .copied()
            .unwrap_or(0)
    }
}

impl CertificateSource for FlakySource {
    fn fetch(&self, identity: &Identity, csr_pem: String) -> FetchFuture<'_> {
        self.fetch_with_ttl(identity, csr_pem, 24 * HOUR)
    }

    fn fetch_with_ttl(
        &self,
        identity: &Identity,
        csr_pem: String,
        ttl: Duration,
    ) -> FetchFuture<'_> {
        let identity = identity.clone();
        Box::pin(async move {
            *self
                .attempts
                .lock()
                .unwrap()
                .entry(identity.clone())
                .or_default() += 1;
            tokio::time::sleep(self.latency).await;
            if self.failing.lock().unwrap().contains(&identity) {
                return Err(FetchError::Unavailable(
                    "connection refused (test)".to_owned(),
                ));
            }
            self.ca.fetch_with_ttl(&identity, csr_pem, ttl).await
        })
    }
}

fn config(ttl: Duration) -> StoreConfig {
    StoreConfig {
        ttl,
        ..StoreConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_fetch() {
    let source = FlakySource::new(Duration::from_secs(1));
    let store = CertStore::new(source.clone(), config(HOUR));
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            let web = web.clone();
            tokio::spawn(async move { store.get(&web).await.unwrap() })
        })
        .collect();
    let mut certs = Vec::new();
    for caller in callers {
        certs.push(caller.await.unwrap());
    }
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(source.attempts(&web), 1);
    assert_eq!(certs[0].identity(), &web);
    let lifetime = certs[0]
        .not_after()
        .duration_since(certs[0].not_before())
        .unwrap();
    assert_eq!(lifetime, HOUR, "the CA source signs with the store's ttl");
}

#[tokio::test(start_paused = true)]
async fn refresh_at_half_life_yields_a_new_certificate_for_subscribers() {
    let source = FlakySource::new(Duration::ZERO);
    let store = CertStore::new(source.clone(), config(HOUR));
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let first = store.get(&web).await.unwrap();
    let mut updates = store.subscribe(&web);
    assert!(Arc::ptr_eq(
        updates.borrow_and_update().as_ref().unwrap(),
        &first
    ));

    // Half-life is 30 min, jitter ±3 min: nothing happens before 27 min.
    tokio::time::sleep(25 * MINUTE).await;
    assert_eq!(source.attempts(&web), 1);
    assert!(!updates.has_changed().unwrap());

    tokio::time::timeout(10 * MINUTE, updates.changed())
        .await
        .expect("rotation by 35 min")
        .unwrap();
    let second = updates.borrow_and_update().clone().unwrap();
    assert!(!Arc::ptr_eq(&second, &first));
    assert_ne!(second.chain_pem(), first.chain_pem());
    assert_eq!(source.attempts(&web), 2);
    assert!(Arc::ptr_eq(&store.get(&web).await.unwrap(), &second));
}

#[tokio::test(start_paused = true)]
async fn failing_identity_backs_off_while_another_is_served() {
    let source = FlakySource::new(Duration::ZERO);
    let store = CertStore::new(
        source.clone(),
        StoreConfig {
            max_concurrent_fetches: 1,
            ..config(HOUR)
        },
    );
    let broken = id("spiffe://cluster.local/ns/default/sa/broken");
    let fine = id("spiffe://cluster.local/ns/default/sa/fine");
    source.set_failing(&broken, true);

    let error = store.get(&broken).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "no certificate for spiffe://cluster.local/ns/default/sa/broken: the certificate \
         authority is unreachable: connection refused (test)"
    );
    assert_eq!(store.get(&fine).await.unwrap().identity(), &fine);

    // Retries at 0.5, 1, 2, ... 128 s (±20 %), then every 150 s: after 300 s that is 9 or 10
    // attempts in all (a fixed 500 ms retry would have made 600).
    tokio::time::sleep(Duration::from_secs(300)).await;
    let attempts = source.attempts(&broken);
    assert!((9..=10).contains(&attempts), "{attempts} attempts in 300 s");
    assert_eq!(source.attempts(&fine), 1);
    assert!(store.get(&fine).await.is_ok());

    let snapshot = store.snapshot();
    assert_eq!(snapshot.len(), 2);
    assert_eq!(snapshot[0].identity, broken);
    assert_eq!(
        snapshot[0].state,
        CertState::Failing {
            last_error: error.to_string(),
            failed_attempts: attempts,
        }
    );
    assert_eq!(snapshot[0].not_after, None);
    assert_eq!(snapshot[1].identity, fine);
    assert_eq!(snapshot[1].state, CertState::Available);
    assert_eq!(snapshot[1].chain_pem.len(), 1);
    assert_eq!(snapshot[1].roots_pem, [source.ca.root_pem()]);
}

#[tokio::test(start_paused = true)]
async fn old_certificate_is_kept_while_refreshes_fail() {
    let source = FlakySource::new(Duration::ZERO);
    let store = CertStore::new(source.clone(), config(HOUR));
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let first = store.get(&web).await.unwrap();
    let mut updates = store.subscribe(&web);
    updates.borrow_and_update();
    source.set_failing(&web, true);

    // The refresh at ~30 min fails and keeps retrying until 45 min.
    tokio::time::sleep(45 * MINUTE).await;
    assert!(
        source.attempts(&web) >= 3,
        "{} attempts",
        source.attempts(&web)
    );
    assert!(Arc::ptr_eq(&store.get(&web).await.unwrap(), &first));
    assert!(!updates.has_changed().unwrap());
    let status = &store.snapshot()[0];
    assert!(
        matches!(status.state, CertState::Failing { .. }),
        "{:?}",
        status.state
    );
    assert_eq!(status.not_after, Some(first.not_after()));

    // The CA recovers: the next retry (at most 150 s away) rotates.
    source.set_failing(&web, false);
    tokio::time::timeout(3 * MINUTE, updates.changed())
        .await
        .expect("rotation after the CA recovered")
        .unwrap();
    assert!(!Arc::ptr_eq(updates.borrow().as_ref().unwrap(), &first));
    assert_eq!(store.snapshot()[0].state, CertState::Available);
}

#[tokio::test(start_paused = true)]
async fn forget_stops_refreshing() {
    let source = FlakySource::new(Duration::ZERO);
    let store = CertStore::new(source.clone(), config(HOUR));
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    store.get(&web).await.unwrap();
    let mut updates = store.subscribe(&web);
    updates.borrow_and_update();

    store.forget(&web);
    assert!(updates.borrow_and_update().is_none());
    assert!(store.snapshot().is_empty());
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(source.attempts(&web), 1);
}

#[tokio::test(start_paused = true)]
async fn forget_wakes_waiting_callers() {
    let source = FlakySource::new(10 * MINUTE);
    let store = CertStore::new(source.clone(), config(HOUR));
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let waiter = {
        let store = store.clone();
        let web = web.clone();
        tokio::spawn(async move { store.get(&web).await })
    };
    tokio::time::sleep(MINUTE).await;
    store.forget(&web);
    let error = tokio::time::timeout(MINUTE, waiter)
        .await
        .expect("waiter woke")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the certificate of spiffe://cluster.local/ns/default/sa/web is no longer managed \
         (it was forgotten)"
    );
}
