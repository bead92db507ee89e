//! The one bounded pool of threads for the CPU work around inference:
//! decoding, rectification, statistics and encoding of every request, and the
//! parallel parts inside them (the two images of a pair, the images of a JSON
//! answer, a PNG's strips).
//!
//! It is rayon's global pool, sized once at start-up, so the nested
//! parallelism in the codecs (`rayon::join`, `rayon::scope`) lands on the same
//! threads as the request steps: no request starts a thread of its own, and
//! however many requests arrive the process holds this many CPU workers, the
//! engine thread, libtorch's intra-op pool and the async runtime's threads.

use std::sync::OnceLock;

/// The size the pool was given (or found, when something else built it first).
static SIZE: OnceLock<usize> = OnceLock::new();

/// Threads the pool gets by default: one per core. libtorch's intra-op threads
/// also take every core on CPU, but the two rarely run at once for one request
/// (decode, then inference, then encode), and on a GPU the pool has the CPU
/// to itself.
pub fn default_size() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Builds the pool with `threads` workers (0: [`default_size`]). Only the first
/// call decides; later calls (tests start several servers in one process)
/// keep the pool there is. Returns the pool's size.
pub fn init(threads: usize) -> usize {
    *SIZE.get_or_init(|| {
        let wanted = if threads == 0 { default_size() } else { threads };
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(wanted)
            .thread_name(|i| format!("stereo-cpu-{i}"))
            .build_global();
        // An error means the global pool already exists (built by a first use).
        if built.is_ok() {
            wanted
        } else {
            rayon::current_num_threads()
        }
    })
}

/// Runs `work` on the pool and waits for it without blocking the async runtime.
/// Panics inside `work` are caught and reported as `Err` with their message.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    init(0);
    let (reply, answer) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a CPU step panicked".into())
        });
        let _ = reply.send(outcome);
    });
    answer.await.unwrap_or_else(|_| Err("the CPU pool dropped a task".into()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_the_pool_and_panics_come_back_as_errors() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let name = runtime.block_on(super::run(|| std::thread::current().name().map(str::to_owned))).unwrap();
        assert!(name.is_some_and(|n| n.starts_with("stereo-cpu-") || !n.is_empty()));
        let failed = runtime.block_on(super::run(|| -> u8 { panic!("boom") }));
        assert_eq!(failed, Err("boom".into()));
    }
}
