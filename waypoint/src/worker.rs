//! The data path's threads: one single-threaded runtime per worker, each accepting HBONE
//! connections from the shared listener and serving them start to end on its own thread, with
//! its own upstream connections (as Envoy's workers do).
//!
//! A request crosses several tasks (the downstream HBONE connection, the tunnel's HTTP server,
//! the upstream HTTP connection, the upstream HBONE connection). On one multi-threaded runtime
//! each hand-off could wake another thread, and thread wake-ups were about half of the
//! waypoint's CPU (docs/benchmarks.md); on a worker's own runtime every hand-off of a request
//! stays on one thread.

use std::cell::Cell;
use std::io;
use std::thread::JoinHandle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the data-path worker running on this thread (0 outside the workers, e.g. in
/// tests that serve on their own runtime). Per-worker resources (upstream pools) are chosen by
/// it, so a connection is only used from the thread whose runtime drives it.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Starts `count` worker threads named `waypoint-<i>`, each running `serve(i)` (a clone of
/// `serve`, consumed: what it holds is dropped when its future ends) to its end on a
/// single-threaded runtime of its own, then `linger()` (the tasks `serve` spawned keep running
/// until `linger` resolves; dropping the runtime then cancels what is left).
pub fn start<S, SF, L, LF>(count: usize, serve: S, linger: L) -> io::Result<Vec<JoinHandle<()>>>
where
    S: FnOnce(usize) -> SF + Send + Clone + 'static,
    SF: Future<Output = ()> + 'static,
    L: FnOnce() -> LF + Send + Clone + 'static,
    LF: Future<Output = ()> + 'static,
{
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (serve, linger) = (serve.clone(), linger.clone());
        let thread = std::thread::Builder::new()
            .name(format!("waypoint-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                runtime.block_on(async move {
                    serve(index).await;
                    linger().await;
                });
            })?;
        threads.push(thread);
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_on_its_own_thread_with_its_index() {
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = start(
            3,
            move |index| {
                let tx = tx.clone();
                async move {
                    let name = std::thread::current().name().map(str::to_string);
                    // A task spawned by the worker runs on the same thread, with the same index.
                    let spawned = tokio::spawn(async { current() }).await.ok();
                    let _ = tx.send((index, current(), spawned, name));
                }
            },
            || async {},
        )
        .expect("threads start");
        for thread in threads {
            thread.join().expect("worker ends");
        }
        let mut seen: Vec<_> = rx.try_iter().collect();
        seen.sort();
        assert_eq!(
            seen,
            (0..3)
                .map(|i| (i, i, Some(i), Some(format!("waypoint-{i}"))))
                .collect::<Vec<_>>()
        );
    }
}
