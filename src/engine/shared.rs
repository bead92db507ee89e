//! What the engine's handles and its thread share: a queued job and the slot
//! its pair waits in, the counters of what the engine did, and its pace (for
//! `Retry-After`). A module of its own so the thread's code reads these from
//! a sibling, not from its parent's private items.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::Span;

use super::{cuda_stats, EngineError, Prediction, StereoPair};

/// One request's input, shared between the waiting request and the queued job.
/// A request that goes away empties it, so an abandoned job in the channel keeps
/// no image memory alive and the engine knows to skip it.
pub(crate) type PairSlot = Arc<Mutex<Option<StereoPair>>>;

pub(crate) struct Job {
    pub(crate) pair: PairSlot,
    /// Also compute the per-pixel standard deviation (the model's second method).
    pub(crate) with_uncertainty: bool,
    pub(crate) reply: oneshot::Sender<Result<Prediction, EngineError>>,
    pub(crate) span: Span,
    pub(crate) enqueued: Instant,
}

/// Empties the request's pair slot when the request future is dropped.
pub(crate) struct AbandonOnDrop(pub(crate) PairSlot);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.take();
        }
    }
}

/// Counters of what the engine has done, for `/api/v1/health` and tests.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    /// The CUDA allocator's figures after the last job, when on CUDA
    /// (`u64::MAX`: not known).
    pub(crate) cuda_allocated: AtomicU64,
    pub(crate) cuda_peak: AtomicU64,
}

impl Counters {
    pub(crate) fn new() -> Counters {
        Counters { cuda_allocated: AtomicU64::new(u64::MAX), cuda_peak: AtomicU64::new(u64::MAX), ..Default::default() }
    }

    pub(crate) fn record_cuda_memory(&self, memory: cuda_stats::CudaMemory) {
        self.cuda_allocated.store(memory.allocated_bytes, Ordering::Relaxed);
        self.cuda_peak.store(memory.peak_allocated_bytes, Ordering::Relaxed);
    }
}

/// The engine's speed and its running job, for an honest `Retry-After`: when
/// the queue is full, a place frees when the running job ends. Its end is
/// estimated from its padded pixel count at the recent rate (PSMNet's work is
/// close to linear in pixels), so one long job does not inflate the estimate
/// for the small ones after it, as an average time per job would.
#[derive(Debug, Default)]
pub struct Pace {
    /// Moving average of nanoseconds per padded pixel (weight 1/4 on the newest job).
    ns_per_pixel: AtomicU64,
    /// The running job: when it began (ms since `epoch`) and its padded pixels.
    running_since_ms: AtomicU64,
    running_pixels: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Pace {
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub(crate) fn start(&self, pixels: u64) {
        self.running_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.running_pixels.store(pixels, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.running_pixels.store(0, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, pixels: u64, took: Duration) {
        let rate = (took.as_nanos() as u64) / pixels.max(1);
        let old = self.ns_per_pixel.load(Ordering::Relaxed);
        self.ns_per_pixel.store(if old == 0 { rate } else { (3 * old + rate) / 4 }, Ordering::Relaxed);
    }

    /// Estimated time left of the running job (zero when none runs or it is late).
    pub fn remaining(&self) -> Duration {
        let pixels = self.running_pixels.load(Ordering::Relaxed);
        let expected_ms = pixels * self.ns_per_pixel.load(Ordering::Relaxed) / 1_000_000;
        let elapsed_ms = self.now_ms().saturating_sub(self.running_since_ms.load(Ordering::Relaxed));
        Duration::from_millis(expected_ms.saturating_sub(elapsed_ms))
    }
}
