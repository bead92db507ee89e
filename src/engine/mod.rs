//! The inference engine: one OS thread that owns the TorchScript model.
//!
//! libtorch work is synchronous and heavy, and a GPU serves one forward pass
//! at a time best, so the model lives on a single dedicated thread (the design
//! of text-embeddings-inference's backend thread). Requests reach it through a
//! bounded channel carrying the input pair, a oneshot reply and the request's
//! tracing span. Admission is a semaphore of `queue_depth + 1` places held by
//! the *requests*: when all are taken, [`Engine::predict`] fails at once with
//! [`EngineError::QueueFull`] instead of letting requests pile up, and a
//! request that goes away frees its place at once (its queued job is emptied
//! and skipped by the engine).
//!
//! This module knows nothing of HTTP: the API layer maps [`EngineError`] to
//! status codes.

pub mod buffer_pool;
pub mod cuda_graph;
pub mod cuda_stats;
mod graphs;
mod model;
mod options;
mod shared;
pub mod tensors;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::Rgb32FImage;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::Span;

pub use crate::decode::SizeMismatch;
use crate::disparity::DisparityMap;
pub use model::ExportMetadata;
pub use options::{DeviceChoice, ImageSize, MemoryFormat, Precision};
pub use shared::Pace;
use shared::{AbandonOnDrop, Counters, Job, PairSlot};

/// The model's name wherever it is named: `/api/v1/model`, the metrics, the Open
/// Inference Protocol's routes.
pub const MODEL_NAME: &str = "psmnet-kitti2015";

/// Everything the engine thread needs to load and run the model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The exported TorchScript file; its `.json` sidecar must sit beside it.
    pub model_path: PathBuf,
    pub device: DeviceChoice,
    /// How many requests may wait while one runs; more are refused at once.
    pub queue_depth: usize,
    /// libtorch intra-op threads on CPU; 0 keeps libtorch's default (all cores).
    pub threads: usize,
    /// Layout of the convolution weights.
    pub memory_format: MemoryFormat,
    /// Number format the network runs in.
    pub precision: Precision,
    /// Input sizes to run once before reporting ready (besides the smallest).
    pub warm_sizes: Vec<ImageSize>,
    /// On CUDA: how many input shapes keep a recorded CUDA graph of the
    /// forward pass (replayed instead of launching every kernel); 0 turns
    /// graphs off.
    pub cuda_graphs: usize,
    /// On CUDA: copy through page-locked host buffers (asynchronous DMA)
    /// instead of pageable memory. Off only to measure what it gives.
    pub pinned_staging: bool,
    /// On CPU: serve large tensor buffers from [`buffer_pool`] (kept mapped
    /// between passes) instead of fresh system memory each time.
    pub cpu_buffer_pool: bool,
    /// Test hook for failure paths; `None` in production.
    pub faults: Option<Arc<FaultInjector>>,
}

/// A rectified stereo pair, both images the same size, RGB in [0, 1].
#[derive(Debug, Clone)]
pub struct StereoPair {
    left: Rgb32FImage,
    right: Rgb32FImage,
}

impl StereoPair {
    pub fn new(left: Rgb32FImage, right: Rgb32FImage) -> Result<Self, SizeMismatch> {
        if left.dimensions() != right.dimensions() {
            return Err(SizeMismatch {
                left_width: left.width(),
                left_height: left.height(),
                right_width: right.width(),
                right_height: right.height(),
            });
        }
        Ok(Self { left, right })
    }

    pub fn left(&self) -> &Rgb32FImage {
        &self.left
    }

    pub fn right(&self) -> &Rgb32FImage {
        &self.right
    }

    pub fn dimensions(&self) -> (u32, u32) {
        self.left.dimensions()
    }

    /// The two images back (to rectify them before inference).
    pub fn into_images(self) -> (Rgb32FImage, Rgb32FImage) {
        (self.left, self.right)
    }
}

/// A finished prediction and where its time went.
#[derive(Debug)]
pub struct Prediction {
    pub disparity: DisparityMap,
    /// Standard deviation (px) of the network's distribution over disparities
    /// at each pixel, when asked for: how far to trust each value.
    pub uncertainty: Option<DisparityMap>,
    /// Time spent waiting in the queue.
    pub queue: Duration,
    /// Preprocessing, forward pass, copy back and crop, on the engine thread.
    pub inference: Duration,
    /// `inference` in its parts.
    pub phases: InferencePhases,
}

/// Where an inference's time went on the engine thread. On CUDA the copies
/// up are asynchronous, so `upload` is the CPU's part (into the pinned
/// buffers, and the kernels queued); the GPU's part of it is in `forward`.
#[derive(Debug, Clone, Copy, Default)]
pub struct InferencePhases {
    /// Inputs to the device: copy up, normalise, pad, cast.
    pub upload: Duration,
    /// The network, waited for.
    pub forward: Duration,
    /// Crop on the device, copy back.
    pub download: Duration,
}

/// What the loaded model is, for `/api/v1/model` and the page.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub description: String,
    pub weights_sha256: String,
    pub model_file: String,
    pub model_file_sha256: String,
    pub parameters: u64,
    pub maxdisp: u32,
    pub device: String,
    pub libtorch_version: String,
    pub exported_with_torch: String,
    pub cuda_linked: bool,
    pub cuda_available: bool,
    pub precision: String,
    pub memory_format: String,
    pub size_multiple: u32,
    pub min_size: u32,
}

/// Where the engine stands; published through a watch channel.
#[derive(Debug, Clone)]
pub enum EngineStatus {
    /// Loading the model or running the warm-up pass.
    Loading,
    Ready(Arc<ModelInfo>),
    /// The model could not be loaded; the engine will never serve.
    Failed(String),
}

/// Why a prediction failed. Knows nothing of HTTP.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the model is still loading")]
    NotReady,
    #[error("the inference queue is full ({depth} waiting)")]
    QueueFull { depth: usize, retry_after_secs: u64 },
    #[error("the engine has stopped")]
    Stopped,
    #[error("the model could not be loaded: {0}")]
    Load(String),
    #[error("the device ran out of memory: {0}")]
    OutOfMemory(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// A snapshot of the engine's load and history.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests admitted at once: the running one plus `queue_depth` waiting.
    pub capacity: usize,
    /// Requests admitted now (running or waiting).
    pub in_flight: usize,
    pub completed: u64,
    pub failed: u64,
    /// Jobs skipped because their client went away before they ran.
    pub abandoned: u64,
}

/// Ways to make upcoming inferences fail, to prove that one failure affects
/// only its own request. Production servers never arm it (it is not reachable
/// from the command line); tests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Call the network with a malformed input, so libtorch itself raises an error.
    TorchError,
    /// Fail as a CUDA out-of-memory error does.
    OutOfMemory,
    /// Panic inside the inference code.
    Panic,
}

/// Queue of faults the engine thread consumes, one per inference.
#[derive(Debug, Default)]
pub struct FaultInjector {
    pending: Mutex<std::collections::VecDeque<Fault>>,
}

impl FaultInjector {
    pub fn arm(&self, fault: Fault) {
        self.pending.lock().expect("fault queue").push_back(fault);
    }

    fn next(&self) -> Option<Fault> {
        self.pending.lock().ok()?.pop_front()
    }
}

/// Cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    status: watch::Receiver<EngineStatus>,
    queue_depth: usize,
    /// Admission: `queue_depth + 1` permits, held by requests (not by jobs), so
    /// a request that goes away frees its place at once.
    admission: Arc<Semaphore>,
    counters: Arc<Counters>,
    /// How fast the engine works and what it is doing, for Retry-After.
    pace: Arc<Pace>,
}

impl Engine {
    /// Spawns the engine thread; it loads the model and warms it up in the
    /// background, so the caller can start serving (health says 503) at once.
    pub fn start(config: EngineConfig) -> std::io::Result<Engine> {
        let queue_depth = config.queue_depth.max(1);
        // Admission is bounded by the semaphore; the channel only needs room for
        // admitted jobs plus abandoned (empty) ones the engine has not yet skipped.
        let (jobs, receiver) = mpsc::channel(4 * (queue_depth + 1));
        let (status_tx, status) = watch::channel(EngineStatus::Loading);
        let counters = Arc::new(Counters::new());
        let pace = Arc::new(Pace::default());
        let shared = worker::EngineShared { counters: counters.clone(), pace: pace.clone() };
        std::thread::Builder::new()
            .name("psmnet-engine".into())
            .spawn(move || worker::run_engine(config, receiver, status_tx, shared))?;
        Ok(Engine { jobs, status, queue_depth, admission: Arc::new(Semaphore::new(queue_depth + 1)), counters, pace })
    }

    pub fn status(&self) -> EngineStatus {
        self.status.borrow().clone()
    }

    /// Waits until the model is loaded and warmed up (or failed to load).
    pub async fn wait_ready(&self) -> Result<Arc<ModelInfo>, EngineError> {
        let mut status = self.status.clone();
        loop {
            match &*status.borrow_and_update() {
                EngineStatus::Ready(info) => return Ok(info.clone()),
                EngineStatus::Failed(why) => return Err(EngineError::Load(why.clone())),
                EngineStatus::Loading => {}
            }
            if status.changed().await.is_err() {
                return Err(EngineError::Stopped);
            }
        }
    }

    /// Queues `pair` and waits for its disparity. Fails at once with
    /// `QueueFull` when one request is running and `queue_depth` are waiting.
    ///
    /// Dropping the returned future (client gone) frees the request's place
    /// immediately; if its job has not started, the engine skips it.
    pub async fn predict(&self, pair: StereoPair) -> Result<Prediction, EngineError> {
        self.queue(pair, false).await
    }

    /// [`predict`](Self::predict), with the disparity's per-pixel standard
    /// deviation in [`Prediction::uncertainty`] (from the same pass).
    pub async fn predict_with_uncertainty(&self, pair: StereoPair) -> Result<Prediction, EngineError> {
        self.queue(pair, true).await
    }

    async fn queue(&self, pair: StereoPair, with_uncertainty: bool) -> Result<Prediction, EngineError> {
        match &*self.status.borrow() {
            EngineStatus::Ready(_) => {}
            EngineStatus::Loading => return Err(EngineError::NotReady),
            EngineStatus::Failed(why) => return Err(EngineError::Load(why.clone())),
        }
        let full = || EngineError::QueueFull { depth: self.queue_depth, retry_after_secs: self.estimated_drain_secs() };
        let _permit = self.admission.clone().try_acquire_owned().map_err(|_| full())?;
        let slot: PairSlot = Arc::new(Mutex::new(Some(pair)));
        let _abandon = AbandonOnDrop(slot.clone());
        let (reply, answer) = oneshot::channel();
        let job = Job { pair: slot, with_uncertainty, reply, span: Span::current(), enqueued: Instant::now() };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => full(),
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Refuses at once when every place is taken, so a busy server answers 503
    /// before spending time on reading and decoding an upload it cannot serve.
    /// (A place can still be taken between this check and [`Engine::predict`],
    /// which checks again.)
    pub fn check_capacity(&self) -> Result<(), EngineError> {
        if self.admission.available_permits() == 0 {
            return Err(EngineError::QueueFull {
                depth: self.queue_depth,
                retry_after_secs: self.estimated_drain_secs(),
            });
        }
        Ok(())
    }

    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    pub fn stats(&self) -> EngineStats {
        let capacity = self.queue_depth + 1;
        EngineStats {
            capacity,
            in_flight: capacity - self.admission.available_permits(),
            completed: self.counters.completed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            abandoned: self.counters.abandoned.load(Ordering::Relaxed),
        }
    }

    /// The CUDA allocator's tensor memory as of the last job (or the warm-up);
    /// `None` on CPU or where this build cannot read it. Never calls into CUDA.
    pub fn cuda_memory(&self) -> Option<cuda_stats::CudaMemory> {
        let allocated_bytes = self.counters.cuda_allocated.load(Ordering::Relaxed);
        let peak_allocated_bytes = self.counters.cuda_peak.load(Ordering::Relaxed);
        (allocated_bytes != u64::MAX).then_some(cuda_stats::CudaMemory { allocated_bytes, peak_allocated_bytes })
    }

    /// Seconds until a place frees: what is left of the running job.
    fn estimated_drain_secs(&self) -> u64 {
        self.pace.remaining().as_secs_f64().ceil().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_what_is_left_of_the_running_job() {
        let pace = Pace::default();
        pace.record(1_000_000, Duration::from_secs(20)); // one long job: 20 us a pixel
        pace.record(1_000_000, Duration::from_secs(4));
        pace.record(1_000_000, Duration::from_secs(4));
        // Rate now (3 * ((3 * 20 + 4) / 4) + 4) / 4 = 13 us; a small 0.25 MP job is ~3 s, not 20.
        pace.start(250_000);
        let left = pace.remaining();
        assert!(left > Duration::from_millis(3000) && left < Duration::from_millis(3300), "{left:?}");
        pace.finish();
        assert_eq!(pace.remaining(), Duration::ZERO);
    }

    #[test]
    fn pair_requires_equal_sizes() {
        let err = StereoPair::new(Rgb32FImage::new(4, 3), Rgb32FImage::new(4, 2)).unwrap_err();
        assert_eq!(err.to_string(), "left image is 4x3 but right image is 4x2; a rectified pair has one size");
        assert_eq!(StereoPair::new(Rgb32FImage::new(4, 3), Rgb32FImage::new(4, 3)).unwrap().dimensions(), (4, 3));
    }
}
