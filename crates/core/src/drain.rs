//! The drain primitive: a trigger that asks every holder of a [`DrainWatcher`] to finish, waits for
//! them up to a deadline, and then tells the stragglers to abort.
//!
//! Every long-lived task (listener, connection, xDS stream) holds a watcher. Holding one keeps the
//! drain waiting, so dropping it is how a task says "I am done".

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How a drain asks tasks to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainMode {
    /// Stop accepting new work, finish what is in flight.
    Graceful,
    /// Stop now: the forced signal fires at once.
    Immediate,
}

/// What happened during a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Every watcher was dropped before the deadline.
    pub graceful: bool,
    /// Watchers still alive when the deadline passed (0 when graceful).
    pub remaining_at_deadline: usize,
}

/// How long stragglers get to notice the forced signal before the trigger stops waiting.
const FORCED_GRACE: Duration = Duration::from_secs(1);

/// Creates a linked trigger and watcher.
pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (signal, signal_rx) = watch::channel(None);
    let (alive, alive_rx) = mpsc::channel(1);
    let forced = CancellationToken::new();
    let trigger = DrainTrigger {
        signal,
        forced: forced.clone(),
        alive_rx,
        alive_weak: alive.downgrade(),
    };
    let watcher = DrainWatcher {
        signal: signal_rx,
        forced,
        _alive: alive,
    };
    (trigger, watcher)
}

/// Starts a drain. Owned by whoever decides the process (or a pod's proxy) should stop.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<Option<DrainMode>>,
    forced: CancellationToken,
    alive_rx: mpsc::Receiver<()>,
    alive_weak: mpsc::WeakSender<()>,
}

impl DrainTrigger {
    /// Signals every watcher, waits until all are dropped or `deadline` passes, then fires the
    /// forced signal and waits briefly for the rest.
    pub async fn start_drain_and_wait(
        mut self,
        mode: DrainMode,
        deadline: Duration,
    ) -> DrainOutcome {
        self.signal.send_replace(Some(mode));
        let deadline = match mode {
            DrainMode::Graceful => deadline,
            DrainMode::Immediate => {
                self.forced.cancel();
                Duration::ZERO
            }
        };
        if tokio::time::timeout(deadline, self.alive_rx.recv())
            .await
            .is_ok()
        {
            return DrainOutcome {
                graceful: mode == DrainMode::Graceful,
                remaining_at_deadline: 0,
            };
        }
        let remaining = self.alive_weak.strong_count();
        self.forced.cancel();
        if remaining > 0 {
            let _ = tokio::time::timeout(FORCED_GRACE, self.alive_rx.recv()).await;
        }
        DrainOutcome {
            graceful: false,
            remaining_at_deadline: remaining,
        }
    }

    /// Number of live watchers (for tests and debug endpoints).
    pub fn watchers(&self) -> usize {
        self.alive_weak.strong_count()
    }
}

/// Held by every task that must finish before a drain completes. Each clone counts on its own.
#[derive(Clone, Debug)]
pub struct DrainWatcher {
    signal: watch::Receiver<Option<DrainMode>>,
    forced: CancellationToken,
    // Every clone is one live handle; the trigger waits until all are dropped.
    _alive: mpsc::Sender<()>,
}

impl DrainWatcher {
    /// Resolves when a drain starts. A dropped trigger counts as an immediate drain.
    pub async fn signaled(&self) -> DrainMode {
        let mut rx = self.signal.clone();
        loop {
            if let Some(mode) = *rx.borrow_and_update() {
                return mode;
            }
            if rx.changed().await.is_err() {
                return DrainMode::Immediate;
            }
        }
    }

    /// Resolves when the holder must abort now: the deadline passed or the drain is immediate.
    pub async fn forced(&self) {
        self.forced.cancelled().await;
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        self.signal.borrow().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn graceful_completion_before_deadline() {
        let (trigger, watcher) = new();
        let task = tokio::spawn(async move {
            let mode = watcher.signaled().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(watcher);
            mode
        });
        let outcome = trigger
            .start_drain_and_wait(DrainMode::Graceful, Duration::from_secs(10))
            .await;
        assert_eq!(
            outcome,
            DrainOutcome {
                graceful: true,
                remaining_at_deadline: 0
            }
        );
        assert_eq!(task.await.unwrap(), DrainMode::Graceful);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_forced_and_stragglers_abort() {
        let (trigger, watcher) = new();
        let stubborn = watcher.clone();
        drop(watcher);
        let task = tokio::spawn(async move {
            stubborn.signaled().await;
            // Ignores the graceful signal until forced.
            stubborn.forced().await;
            "aborted"
        });
        let outcome = trigger
            .start_drain_and_wait(DrainMode::Graceful, Duration::from_secs(5))
            .await;
        assert_eq!(
            outcome,
            DrainOutcome {
                graceful: false,
                remaining_at_deadline: 1
            }
        );
        assert_eq!(task.await.unwrap(), "aborted");
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_cloned_after_the_signal_see_it_at_once() {
        let (trigger, watcher) = new();
        let late = watcher.clone();
        let handle =
            tokio::spawn(trigger.start_drain_and_wait(DrainMode::Graceful, Duration::from_secs(5)));
        tokio::task::yield_now().await;
        let later = late.clone();
        assert!(later.is_draining());
        assert_eq!(later.signaled().await, DrainMode::Graceful);
        drop((watcher, late, later));
        assert!(handle.await.unwrap().graceful);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_mode_forces_at_once() {
        let (trigger, watcher) = new();
        let task = tokio::spawn(async move {
            watcher.forced().await;
            watcher.signaled().await
        });
        let outcome = trigger
            .start_drain_and_wait(DrainMode::Immediate, Duration::from_secs(60))
            .await;
        assert!(!outcome.graceful);
        assert_eq!(task.await.unwrap(), DrainMode::Immediate);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_every_clone() {
        let (trigger, watcher) = new();
        let a = watcher.clone();
        let b = a.clone();
        assert_eq!(trigger.watchers(), 3);
        drop((watcher, a, b));
        let outcome = trigger
            .start_drain_and_wait(DrainMode::Graceful, Duration::from_secs(1))
            .await;
        assert!(outcome.graceful);
    }
}
