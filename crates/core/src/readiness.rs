//! Readiness: a process is ready when no named task is pending.
//!
//! Each start-up dependency (initial xDS sync, ZDS snapshot, first certificate) registers a task
//! and drops its guard when done; `/healthz/ready` reports the tasks still pending.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// Keeps its task pending until dropped (or [`BlockReady::ready`] is called).
#[derive(Debug)]
#[must_use = "the task is pending only while the guard is alive"]
pub struct BlockReady {
    readiness: Readiness,
    name: String,
}

impl Readiness {
    /// A readiness with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, usize>> {
        // A panic while holding this short lock leaves the map consistent, so poisoning is ignored.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` pending until the returned guard is dropped.
    pub fn register(&self, name: &str) -> BlockReady {
        *self.lock().entry(name.to_string()).or_insert(0) += 1;
        BlockReady {
            readiness: self.clone(),
            name: name.to_string(),
        }
    }

    /// True when nothing is pending.
    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    /// The pending task names, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The status and body `/healthz/ready` answers with.
    pub fn report(&self) -> (u16, String) {
        let pending = self.pending();
        if pending.is_empty() {
            (200, "ready\n".to_string())
        } else {
            (500, format!("not ready, pending: {}\n", pending.join(", ")))
        }
    }
}

impl BlockReady {
    /// Marks the task done.
    pub fn ready(self) {}

    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let mut pending = self.readiness.lock();
        if let Some(count) = pending.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_task_is_done() {
        let r = Readiness::new();
        assert_eq!(r.report(), (200, "ready\n".into()));
        let xds = r.register("xds");
        let zds = r.register("zds snapshot");
        let xds_again = r.register("xds");
        assert_eq!(
            r.report(),
            (500, "not ready, pending: xds, zds snapshot\n".into())
        );
        drop(xds);
        assert_eq!(r.pending(), vec!["xds", "zds snapshot"]);
        xds_again.ready();
        zds.ready();
        assert!(r.is_ready());
    }
}
