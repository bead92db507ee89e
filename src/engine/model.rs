//! The TorchScript PSMNet on its device: loading (layout, precision,
//! metadata checks), one prediction with its phases, CUDA graphs and pinned
//! copies, and the failures a test can inject.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{CModule, Device, IValue, Kind, Tensor};
use tracing::{debug, info, warn};

use super::cuda_graph::{self, CudaGraph};
use super::graphs::{GraphCache, Plan, RecordedForward};
use super::options::{check_cpu_bf16_speed, MemoryFormat, Precision};
use super::shared::Counters;
use super::tensors::{cropped_output, cropped_output_pinned, Normaliser, PinnedStaging};
use super::{EngineConfig, EngineError, Fault, FaultInjector, InferencePhases, ModelInfo, StereoPair};
use crate::disparity::DisparityMap;
use crate::preprocess::PadRule;

/// Re-lays every 4D and 5D parameter (the convolution weights) out channels-last,
/// in place: tch exposes no memory-format argument, so the layout is made by a
/// permute, a contiguous copy and the inverse permute, then swapped in with
/// `set_data`, which the module's own tensors see.
fn to_channels_last(module: &CModule) -> Result<usize, tch::TchError> {
    let _no_grad = tch::no_grad_guard();
    let mut converted = 0;
    for (_, mut parameter) in module.named_parameters()? {
        let (order, inverse): (&[i64], &[i64]) = match parameter.dim() {
            4 => (&[0, 2, 3, 1], &[0, 3, 1, 2]),
            5 => (&[0, 2, 3, 4, 1], &[0, 4, 1, 2, 3]),
            _ => continue,
        };
        let relaid = parameter.f_permute(order)?.f_contiguous()?.f_permute(inverse)?;
        parameter.f_set_data(&relaid)?;
        converted += 1;
    }
    Ok(converted)
}

/// The JSON sidecar `models/export.py` writes next to the TorchScript file.
#[derive(Debug, Clone, Deserialize)]
pub struct ExportMetadata {
    pub name: String,
    pub checkpoint: String,
    pub weights_sha256: String,
    pub model_file_sha256: String,
    pub parameters: u64,
    pub maxdisp: u32,
    pub size_multiple: u32,
    pub min_size: u32,
    pub align_corners: bool,
    #[serde(default)]
    pub batchnorm_folded: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub torch_version: String,
}

impl ExportMetadata {
    /// Reads the sidecar of `model_path` (same name, `.json`).
    pub fn read_for(model_path: &Path) -> Result<Self, String> {
        let path = model_path.with_extension("json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read model metadata {}: {e} (re-run the export)", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Refuses a model exported with preprocessing or size rules other than ours:
    /// it would load and run, and silently give wrong disparities.
    fn check_compatible(&self) -> Result<(), String> {
        let rule = PadRule::PSMNET;
        let same = |a: [f32; 3], b: [f32; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        if self.size_multiple != rule.multiple
            || self.min_size != rule.min_size
            || !same(self.mean, crate::preprocess::IMAGENET_MEAN)
            || !same(self.std, crate::preprocess::IMAGENET_STD)
        {
            return Err(format!(
                "model metadata does not match this server's preprocessing (multiple {}, min {}, mean {:?}, std {:?})",
                self.size_multiple, self.min_size, self.mean, self.std
            ));
        }
        Ok(())
    }
}

fn file_sha256(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// PSMNet loaded on its device. Lives on the engine thread only.
pub(super) struct StereoModel {
    module: CModule,
    pub(super) device: Device,
    /// Element type of the weights, which the inputs are cast to.
    kind: Kind,
    pub(super) rule: PadRule,
    normaliser: Normaliser,
    pub(super) info: ModelInfo,
    /// Page-locked host buffers for the last image size (CUDA with
    /// `pinned_staging` only; `None` until the first request).
    staging: Option<RefCell<Option<PinnedStaging>>>,
    /// Recorded forward passes per input shape (CUDA with `cuda_graphs > 0` only).
    graphs: Option<RefCell<GraphCache>>,
}

/// What one prediction yields: the disparity, its uncertainty when asked
/// for, and where the engine's time went.
pub(super) struct Timed {
    pub(super) disparity: DisparityMap,
    pub(super) uncertainty: Option<DisparityMap>,
    pub(super) phases: InferencePhases,
}

/// The exported module's method that returns the disparity and its standard deviation.
const WITH_UNCERTAINTY: &str = "forward_with_uncertainty";

impl StereoModel {
    pub(super) fn load(config: &EngineConfig) -> Result<Self, String> {
        let path = &config.model_path;
        if !path.is_file() {
            return Err(format!("model file {} not found (produce it with the set-up: make model)", path.display()));
        }
        let meta = ExportMetadata::read_for(path)?;
        meta.check_compatible()?;
        let actual_sha = file_sha256(path)?;
        if actual_sha != meta.model_file_sha256 {
            return Err(format!(
                "{} has sha256 {actual_sha} but its metadata says {}; the two are from different exports",
                path.display(),
                meta.model_file_sha256
            ));
        }
        if config.threads > 0 {
            tch::set_num_threads(config.threads as i32);
        }
        let device = config.device.resolve()?;
        if device.is_cuda() {
            // Input sizes repeat (padded to multiples of 16), so autotuning pays off.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        if device == Device::Cpu && config.cpu_buffer_pool && !super::buffer_pool::install() {
            warn!("the CPU buffer pool could not be installed; running without it");
        }
        let precision = config.precision.resolve(device)?;
        if precision == Precision::Bf16 && device == Device::Cpu {
            check_cpu_bf16_speed()?;
        }
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        module.set_eval();
        if precision != Precision::Fp32 {
            // tch's `to` panics on failure rather than returning it.
            catch_unwind(AssertUnwindSafe(|| module.to(device, precision.kind(), false)))
                .map_err(|_| format!("cannot cast the model to {precision} on {}", device_name(device)))?;
        }
        let memory_format = config.memory_format.resolve(device);
        if memory_format == MemoryFormat::ChannelsLast {
            let converted = to_channels_last(&module).map_err(|e| format!("channels-last weights: {e}"))?;
            debug!(converted, "convolution weights laid out channels-last");
        }
        let info = ModelInfo {
            name: super::MODEL_NAME.into(),
            description: meta.name.clone(),
            weights_sha256: meta.weights_sha256.clone(),
            model_file: path.display().to_string(),
            model_file_sha256: actual_sha,
            parameters: meta.parameters,
            maxdisp: meta.maxdisp,
            device: device_name(device),
            libtorch_version: crate::LIBTORCH_VERSION.into(),
            exported_with_torch: meta.torch_version.clone(),
            cuda_linked: crate::CUDA_LINKED,
            cuda_available: tch::Cuda::is_available(),
            precision: precision.to_string(),
            memory_format: memory_format.name().into(),
            size_multiple: meta.size_multiple,
            min_size: meta.min_size,
        };
        let normaliser = Normaliser::new(device).map_err(|e| format!("preparing the input statistics: {e}"))?;
        let staging = (device.is_cuda() && config.pinned_staging).then(|| RefCell::new(None));
        let graphs = (device.is_cuda() && config.cuda_graphs > 0 && cuda_graph::AVAILABLE)
            .then(|| RefCell::new(GraphCache::new(config.cuda_graphs)));
        if device.is_cuda() && config.cuda_graphs > 0 && !cuda_graph::AVAILABLE {
            warn!("CUDA graphs were asked for but this build has no CUDA graph support; running eagerly");
        }
        Ok(StereoModel {
            module,
            device,
            kind: precision.kind(),
            rule: PadRule::PSMNET,
            normaliser,
            info,
            staging,
            graphs,
        })
    }

    /// Disparity of `pair`'s left image (and its per-pixel standard deviation
    /// when `with_uncertainty`). Every libtorch call is the fallible variant,
    /// so a failure becomes an error for this request only.
    pub(super) fn predict(&self, pair: &StereoPair, with_uncertainty: bool) -> Result<Timed, EngineError> {
        let result = self.predict_timed(pair, with_uncertainty);
        if result.is_err() {
            // Nothing may still be copying from the pinned buffers when the next request writes them.
            self.synchronize();
        }
        result
    }

    fn predict_timed(&self, pair: &StereoPair, with_uncertainty: bool) -> Result<Timed, EngineError> {
        let _no_grad = tch::no_grad_guard();
        let started = Instant::now();
        let (width, height) = pair.dimensions();
        let geometry = self.rule.geometry(width, height);
        let mut staging = match &self.staging {
            Some(cell) => Some(cell.try_borrow_mut().map_err(|_| EngineError::Inference("staging in use".into()))?),
            None => None,
        };
        if let Some(slot) = staging.as_deref_mut() {
            if !slot.as_ref().is_some_and(|s| s.fits(&geometry)) {
                *slot = None; // unpin the old buffers before pinning new ones
                *slot = Some(PinnedStaging::new(&geometry, self.device).map_err(torch_error)?);
            }
        }
        let pinned = staging.as_deref().and_then(Option::as_ref);
        if let Some(buffers) = pinned {
            buffers.write(pair.left(), pair.right()).map_err(torch_error)?;
        }
        let input = |image, buffer: Option<&Tensor>| {
            match buffer {
                Some(buffer) => self.normaliser.input_pinned(buffer, &geometry),
                None => self.normaliser.input(image, &geometry),
            }?
            .f_to_kind(self.kind)
        };
        let left = input(pair.left(), pinned.map(|p| &p.left)).map_err(torch_error)?;
        let right = input(pair.right(), pinned.map(|p| &p.right)).map_err(torch_error)?;
        let uploaded = Instant::now();
        let outputs = self.forward(&left, &right, with_uncertainty)?;
        // Waiting here only moves the wait the copy back would do; it splits the phases.
        self.synchronize();
        let forwarded = Instant::now();
        let mut maps = Vec::with_capacity(outputs.len());
        for (i, output) in outputs.iter().enumerate() {
            let values = match pinned {
                Some(p) => cropped_output_pinned(output, &geometry, &p.outputs[i.min(1)]),
                None => cropped_output(output, &geometry),
            }
            .map_err(torch_error)?
            .ok_or_else(|| {
                EngineError::Inference(format!(
                    "network returned {} values for a {}x{} input",
                    output.numel(),
                    geometry.padded_width,
                    geometry.padded_height
                ))
            })?;
            maps.push(DisparityMap::new(width, height, values).expect("crop yields one value per pixel"));
        }
        let phases = InferencePhases {
            upload: uploaded - started,
            forward: forwarded - uploaded,
            download: forwarded.elapsed(),
        };
        let mut maps = maps.into_iter();
        let disparity = maps.next().ok_or_else(|| EngineError::Inference("the network returned nothing".into()))?;
        Ok(Timed { disparity, uncertainty: maps.next(), phases })
    }

    /// The network's outputs (the disparity, then the deviation when
    /// `with_uncertainty`) for two prepared inputs, straight from the module.
    fn run_module(&self, left: &Tensor, right: &Tensor, with_uncertainty: bool) -> Result<Vec<Tensor>, tch::TchError> {
        if !with_uncertainty {
            return Ok(vec![self.module.forward_ts(&[left, right])?]);
        }
        let inputs = [IValue::Tensor(left.shallow_clone()), IValue::Tensor(right.shallow_clone())];
        match self.module.method_is(WITH_UNCERTAINTY, &inputs)? {
            IValue::Tuple(values) => values
                .into_iter()
                .map(|value| match value {
                    IValue::Tensor(tensor) => Ok(tensor),
                    other => Err(tch::TchError::Kind(format!("{WITH_UNCERTAINTY} returned {other:?}"))),
                })
                .collect(),
            other => Err(tch::TchError::Kind(format!("{WITH_UNCERTAINTY} returned {other:?}, not two tensors"))),
        }
    }

    /// The network's outputs for two prepared inputs: a recorded CUDA graph's
    /// replay where the shape has one, else the TorchScript module (recording
    /// the shape when it is due).
    fn forward(&self, left: &Tensor, right: &Tensor, with_uncertainty: bool) -> Result<Vec<Tensor>, EngineError> {
        let eager = || self.run_module(left, right, with_uncertainty).map_err(torch_error);
        let (Some(cell), Device::Cuda(index)) = (&self.graphs, self.device) else { return eager() };
        let mut graphs = cell.try_borrow_mut().map_err(|_| EngineError::Inference("graph cache in use".into()))?;
        let shape = (left.size()[2], left.size()[3], with_uncertainty);
        match graphs.plan(shape) {
            Plan::Eager => return eager(),
            Plan::Replay => {}
            Plan::Record { evict } => {
                if let Some(old) = evict {
                    graphs.evict(old);
                    debug!(?old, "dropped the least recently used CUDA graph");
                }
                let started = Instant::now();
                match self.record(index, left, right, with_uncertainty) {
                    Ok(recorded) => {
                        graphs.insert(shape, recorded);
                        let recorded = graphs.shapes();
                        info!(
                            ?shape,
                            ?recorded,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "CUDA graph recorded"
                        );
                    }
                    Err(why) => {
                        warn!(?shape, %why, "recording a CUDA graph failed; this shape runs eagerly");
                        graphs.mark_failed(shape);
                        cuda_graph::empty_cache();
                        return eager();
                    }
                }
                // The eager passes' blocks are not needed beside the graph's own pool.
                cuda_graph::empty_cache();
            }
        }
        let recorded = graphs.get(shape).ok_or_else(|| EngineError::Inference("recorded graph missing".into()))?;
        recorded.left.shallow_clone().f_copy_(left).map_err(torch_error)?;
        recorded.right.shallow_clone().f_copy_(right).map_err(torch_error)?;
        recorded.graph.replay().map_err(EngineError::Inference)?;
        Ok(recorded.outputs.iter().map(Tensor::shallow_clone).collect())
    }

    /// Records one forward pass reading fixed input tensors (made here, outside
    /// the recording, so they stay valid for every replay).
    fn record(
        &self,
        index: usize,
        left: &Tensor,
        right: &Tensor,
        with_uncertainty: bool,
    ) -> Result<RecordedForward, String> {
        let fixed = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            let mut copy = t.f_empty_like()?;
            copy.f_copy_(t)?;
            Ok(copy)
        };
        let (left, right) = (fixed(left).map_err(|e| e.to_string())?, fixed(right).map_err(|e| e.to_string())?);
        let (graph, outputs) = CudaGraph::record(index, || self.run_module(&left, &right, with_uncertainty))?;
        Ok(RecordedForward { left, right, outputs, graph })
    }

    /// Waits for the model's CUDA device (nothing on the CPU).
    fn synchronize(&self) {
        if let Device::Cuda(index) = self.device {
            // tch panics on a CUDA error here; the engine loop turns a panic into this request's error.
            tch::Cuda::synchronize(index as i64);
        }
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn torch_error(e: tch::TchError) -> EngineError {
    let text = e.to_string();
    // Keep only the first line: libtorch appends long C++ backtraces.
    let first = text.lines().next().unwrap_or("libtorch error").to_owned();
    if text.contains("out of memory") || text.contains("CUDA error: out of memory") {
        EngineError::OutOfMemory(first)
    } else {
        EngineError::Inference(first)
    }
}

impl StereoModel {
    /// Publishes the CUDA allocator's figures for `/metrics` (a cheap read of
    /// its counters, done here so that scraping never touches CUDA).
    pub(super) fn record_cuda_memory(&self, counters: &Counters) {
        if let Device::Cuda(index) = self.device {
            if let Some(memory) = super::cuda_stats::read(index) {
                counters.record_cuda_memory(memory);
            }
        }
    }

    /// `predict`, or the failure a test armed for this inference.
    pub(super) fn predict_or_fault(
        &self,
        pair: &StereoPair,
        with_uncertainty: bool,
        faults: Option<&FaultInjector>,
    ) -> Result<Timed, EngineError> {
        match faults.and_then(FaultInjector::next) {
            None => self.predict(pair, with_uncertainty),
            Some(Fault::TorchError) => {
                // One channel where the network expects three: libtorch raises a real error.
                let _no_grad = tch::no_grad_guard();
                let wrong = Tensor::f_zeros([1, 1, 256, 256], (self.kind, self.device)).map_err(torch_error)?;
                let _unexpected = self.module.forward_ts(&[&wrong, &wrong]).map_err(torch_error)?;
                Err(EngineError::Inference("a malformed input was accepted".into()))
            }
            Some(Fault::OutOfMemory) => Err(torch_error(tch::TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)".into(),
            ))),
            Some(Fault::Panic) => panic!("injected fault: panic during inference"),
        }
    }
}
