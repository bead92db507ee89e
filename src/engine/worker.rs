//! The engine thread's body: load the model, warm it up, then run queued jobs
//! one at a time until every handle is dropped, counting what happens.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::graphs::EAGER_RUNS_BEFORE_RECORDING;
use super::model::{StereoModel, Timed};
use super::options::ImageSize;
use super::shared::{Counters, Job, Pace};
use super::{EngineConfig, EngineError, EngineStatus, Prediction, StereoPair};

/// State the engine thread shares with its [`Engine`](super::Engine) handles.
pub(super) struct EngineShared {
    pub counters: Arc<Counters>,
    pub pace: Arc<Pace>,
}

/// Runs one pass at the smallest input (allocates buffers and, on CUDA,
/// selects cuDNN algorithms), then one per `sizes` (`--warm-sizes`), so the
/// first real request at those sizes pays neither cuDNN autotuning nor the
/// TorchScript profiling executor's first runs. Each is logged with its time.
fn warm_up(model: &StereoModel, sizes: &[ImageSize], shared: &EngineShared) -> Result<(), String> {
    let smallest = ImageSize { width: model.rule.min_size, height: model.rule.min_size };
    for (i, size) in std::iter::once(smallest).chain(sizes.iter().copied()).enumerate() {
        let started = Instant::now();
        let blank = image::Rgb32FImage::new(size.width, size.height);
        let pair = StereoPair::new(blank.clone(), blank).expect("same size");
        // On CUDA the asked-for sizes run until they replay a recorded graph (or,
        // without graphs, until the profiling executor's optimised pass has run).
        // The smallest runs the uncertainty method, which also proves the model
        // file has it (an export older than it would fail here, not on a request).
        let passes = if i > 0 && model.device.is_cuda() { EAGER_RUNS_BEFORE_RECORDING + 1 } else { 1 };
        for _ in 0..passes {
            match catch_unwind(AssertUnwindSafe(|| model.predict(&pair, i == 0))) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("warm-up inference at {size} failed: {e}")),
                Err(_) => return Err(format!("warm-up inference at {size} panicked")),
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        if i == 0 {
            let pixels = model.rule.geometry(size.width, size.height).padded_len() as u64;
            shared.pace.record(pixels, started.elapsed());
        }
        info!(size = %size, elapsed_ms = ms, "warm-up pass done");
    }
    Ok(())
}

/// Body of the engine thread: load, warm up, then serve jobs until every
/// [`Engine`](super::Engine) handle is dropped.
pub(super) fn run_engine(
    config: EngineConfig,
    mut jobs: mpsc::Receiver<Job>,
    status: watch::Sender<EngineStatus>,
    shared: EngineShared,
) {
    let started = Instant::now();
    let model = match StereoModel::load(&config) {
        Ok(model) => model,
        Err(why) => {
            error!(%why, "model failed to load");
            status.send_replace(EngineStatus::Failed(why));
            return;
        }
    };
    info!(device = %model.info.device, model = %config.model_path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "model loaded");

    if let Err(why) = warm_up(&model, &config.warm_sizes, &shared) {
        error!(%why, "warm-up failed");
        status.send_replace(EngineStatus::Failed(why));
        return;
    }
    model.record_cuda_memory(&shared.counters);
    status.send_replace(EngineStatus::Ready(Arc::new(model.info.clone())));

    let counters = &shared.counters;
    while let Some(job) = jobs.blocking_recv() {
        let _span = job.span.enter();
        // Taking the pair out empties the slot: from here the job owns its input.
        let pair = job.pair.lock().ok().and_then(|mut slot| slot.take());
        let Some(pair) = pair.filter(|_| !job.reply.is_closed()) else {
            counters.abandoned.fetch_add(1, Ordering::Relaxed);
            debug!("client went away while queued; skipping");
            continue;
        };
        let queue = job.enqueued.elapsed();
        let begun = Instant::now();
        let (width, height) = pair.dimensions();
        let pixels = model.rule.geometry(width, height).padded_len() as u64;
        shared.pace.start(pixels);
        let with_uncertainty = job.with_uncertainty;
        let result = match catch_unwind(AssertUnwindSafe(|| {
            model.predict_or_fault(&pair, with_uncertainty, config.faults.as_deref())
        })) {
            Ok(result) => result,
            Err(_) => Err(EngineError::Inference("the inference code panicked".into())),
        };
        let inference = begun.elapsed();
        match &result {
            Ok(_) => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
                shared.pace.record(pixels, inference);
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "inference failed");
            }
        }
        shared.pace.finish();
        model.record_cuda_memory(&shared.counters);
        // The receiver may have gone while we ran; nothing to do then.
        let _ = job.reply.send(result.map(|Timed { disparity, uncertainty, phases }| Prediction {
            disparity,
            uncertainty,
            queue,
            inference,
            phases,
        }));
    }
    debug!("all engine handles dropped; engine thread exits");
}
