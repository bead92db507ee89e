//! The TorchScript PSMNet on its device, and the engine thread's loop.

use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{CModule, Device, IValue, Kind, Tensor};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::cuda_graph::{self, CudaGraph};
use super::graphs::{GraphCache, Plan, RecordedForward, EAGER_RUNS_BEFORE_RECORDING};
use super::tensors::{cropped_output, cropped_output_pinned, Normaliser, PinnedStaging};
use super::{
    EngineConfig, EngineError, EngineStatus, Fault, FaultInjector, InferencePhases, Job, ModelInfo, Prediction,
    StereoPair,
};
use crate::disparity::DisparityMap;
use crate::preprocess::PadRule;

/// Which device the model runs on, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device if one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The concrete device, or why it cannot be used here.
    fn resolve(self) -> Result<Device, String> {
        let cuda_count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto if cuda_count > 0 => Ok(Device::Cuda(0)),
            DeviceChoice::Auto => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) if n < cuda_count => Ok(Device::Cuda(n)),
            DeviceChoice::Cuda(n) => Err(format!(
                "device cuda:{n} was asked for but {cuda_count} CUDA device(s) are usable{}",
                if crate::CUDA_LINKED { "" } else { " (this binary was built without libtorch_cuda)" }
            )),
        }
    }
}

/// How convolution weights are laid out in memory, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryFormat {
    /// Channels-last everywhere: about 20 % faster on the CPU with oneDNN, and
    /// on CUDA cuDNN's fp16 3D convolutions run NDHWC without reorders
    /// (measured on an H100 at KITTI size, see docs/performance.md).
    Auto,
    Contiguous,
    /// NHWC / NDHWC weights, so oneDNN and cuDNN can skip layout reorders.
    ChannelsLast,
}

impl FromStr for MemoryFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(MemoryFormat::Auto),
            "contiguous" | "nchw" => Ok(MemoryFormat::Contiguous),
            "channels-last" | "channels_last" | "nhwc" => Ok(MemoryFormat::ChannelsLast),
            _ => Err(format!("unknown memory format '{s}': expected auto, contiguous or channels-last")),
        }
    }
}

impl MemoryFormat {
    fn resolve(self, device: Device) -> MemoryFormat {
        match (self, device) {
            (MemoryFormat::Auto, _) => MemoryFormat::ChannelsLast,
            (chosen, _) => chosen,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MemoryFormat::Auto => "auto",
            MemoryFormat::Contiguous => "contiguous",
            MemoryFormat::ChannelsLast => "channels-last",
        }
    }
}

/// Number format of the network's weights and activations, as configured.
/// Whatever it is, the final soft-argmin (softmax over disparities and the
/// weighted sum) runs in fp32: the exported graph casts the logits to fp32
/// before it, so the disparity keeps its sub-pixel resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// fp32 on the CPU (bf16 measured no faster there: 8.4 s vs 8.1 s at KITTI
    /// size); fp16 on CUDA, where tensor cores make it the fastest and its
    /// end-point error stays within 0.01 px of fp32's on every shared pair
    /// (bf16, as fast, does not: 8 bits of mantissa; see docs/performance.md).
    Auto,
    Fp32,
    /// bfloat16: fp32's range, 8 bits of mantissa. Runs on CPU and CUDA.
    Bf16,
    /// IEEE half precision. CUDA only: on the CPU libtorch runs it, but over
    /// 25 times slower than fp32 (no native kernels), so it is refused there.
    Fp16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Precision::Auto),
            "fp32" | "float32" | "float" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp16" | "float16" | "half" => Ok(Precision::Fp16),
            _ => Err(format!("unknown precision '{s}': expected fp32, bf16, fp16 or auto")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

impl Precision {
    /// The concrete precision on `device`, or why it cannot run there.
    fn resolve(self, device: Device) -> Result<Precision, String> {
        match (self, device) {
            (Precision::Auto, Device::Cpu) => Ok(Precision::Fp32),
            (Precision::Auto, _) => Ok(Precision::Fp16),
            (Precision::Fp16, Device::Cpu) => {
                Err("precision fp16 is refused on the CPU: libtorch has no fast fp16 kernels there (one 256x256 \
                 pass took over 25 times as long as in fp32); use bf16 or fp32, or run on CUDA"
                    .into())
            }
            (chosen, _) => Ok(chosen),
        }
    }

    fn kind(self) -> Kind {
        match self {
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
            Precision::Auto | Precision::Fp32 => Kind::Float,
        }
    }
}

/// Whether an x86-64 CPU has the instructions libtorch's fast bf16 kernels
/// need (AVX-512 BF16 or AMX), from the kernel's CPU flags; `None` where that
/// cannot be read (another architecture or OS), and the timing probe decides.
fn cpu_has_bf16_instructions() -> Option<bool> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return None;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|line| line.starts_with("flags"))?;
    Some(flags.split_whitespace().any(|flag| flag == "avx512_bf16" || flag == "amx_bf16"))
}

/// Refuses bf16 on a CPU that has no fast bf16 kernels. Without AVX-512 BF16
/// or AMX, libtorch computes bf16 3D convolutions by a reference path that
/// measured 600 times slower than fp32 on an AVX2 EPYC (104 s for one of
/// PSMNet's cost-volume convolutions): a server would never finish warming
/// up. One small 3D convolution in each type tells (milliseconds where bf16 is
/// fast, about a second where it is not).
fn check_cpu_bf16_speed() -> Result<(), String> {
    // The CPU's flags first: a timing can be fooled by other work on the machine (a
    // busy CI runner slowed the fp32 runs enough to let bf16 through, and a bf16 pass
    // then ran for hours), the flags cannot.
    match cpu_has_bf16_instructions() {
        Some(false) => {
            return Err("precision bf16 is refused on this CPU: it has no fast bf16 kernels (neither AVX-512 BF16 \
                        nor AMX in its flags); use fp32, or run on CUDA"
                .into())
        }
        Some(true) => return Ok(()),
        None => {}
    }
    let probe = || -> Result<(f64, f64), tch::TchError> {
        let _no_grad = tch::no_grad_guard();
        let input = Tensor::f_ones([1, 16, 8, 24, 24], (Kind::Float, Device::Cpu))?;
        let weight = Tensor::f_ones([16, 16, 3, 3, 3], (Kind::Float, Device::Cpu))?;
        let time = |input: &Tensor, weight: &Tensor| -> Result<f64, tch::TchError> {
            let started = Instant::now();
            let _ = input.f_conv3d(weight, None::<&Tensor>, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)?;
            Ok(started.elapsed().as_secs_f64())
        };
        let (input16, weight16) = (input.f_to_kind(Kind::BFloat16)?, weight.f_to_kind(Kind::BFloat16)?);
        // First calls: kernel selection, allocation. Then the fastest of a few
        // interleaved runs each: on a loaded machine one run can be descheduled for
        // tens of milliseconds, which made a single fp32 timing look as slow as
        // bf16 and let bf16 through on a CPU where it takes hours per pair.
        time(&input, &weight)?;
        time(&input16, &weight16)?;
        let (mut fp32, mut bf16) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            fp32 = fp32.min(time(&input, &weight)?);
            bf16 = bf16.min(time(&input16, &weight16)?);
        }
        Ok((fp32, bf16))
    };
    let (fp32, bf16) = probe().map_err(|e| format!("bf16 on the CPU: {e}"))?;
    if bf16 > 4.0 * fp32 + 0.002 {
        return Err(format!(
            "precision bf16 is refused on this CPU: it has no fast bf16 kernels (a small 3D convolution took \
             {:.0} times as long as in fp32; that needs AVX-512 BF16 or AMX); use fp32, or run on CUDA",
            bf16 / fp32.max(1e-9)
        ));
    }
    Ok(())
}

/// A `WIDTHxHEIGHT` image size, as given to `--warm-sizes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

impl FromStr for ImageSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not an image size: write WIDTHxHEIGHT, e.g. 1242x375");
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let (width, height): (u32, u32) = (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
        if width == 0 || height == 0 || u64::from(width) * u64::from(height) > 50_000_000 {
            return Err(format!("{s}: sides must be positive and the image at most 50 M pixels"));
        }
        Ok(ImageSize { width, height })
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

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
struct StereoModel {
    module: CModule,
    device: Device,
    /// Element type of the weights, which the inputs are cast to.
    kind: Kind,
    rule: PadRule,
    normaliser: Normaliser,
    info: ModelInfo,
    /// Page-locked host buffers for the last image size (CUDA with
    /// `pinned_staging` only; `None` until the first request).
    staging: Option<RefCell<Option<PinnedStaging>>>,
    /// Recorded forward passes per input shape (CUDA with `cuda_graphs > 0` only).
    graphs: Option<RefCell<GraphCache>>,
}

/// What one prediction yields: the disparity, its uncertainty when asked
/// for, and where the engine's time went.
struct Timed {
    disparity: DisparityMap,
    uncertainty: Option<DisparityMap>,
    phases: InferencePhases,
}

/// The exported module's method that returns the disparity and its standard deviation.
const WITH_UNCERTAINTY: &str = "forward_with_uncertainty";

impl StereoModel {
    fn load(config: &EngineConfig) -> Result<Self, String> {
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
            name: "psmnet-kitti2015".into(),
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
    fn predict(&self, pair: &StereoPair, with_uncertainty: bool) -> Result<Timed, EngineError> {
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

/// State the engine thread shares with its [`Engine`](super::Engine) handles.
pub(super) struct EngineShared {
    pub counters: Arc<super::Counters>,
    pub pace: Arc<super::Pace>,
}

impl StereoModel {
    /// Publishes the CUDA allocator's figures for `/metrics` (a cheap read of
    /// its counters, done here so that scraping never touches CUDA).
    fn record_cuda_memory(&self, shared: &EngineShared) {
        if let Device::Cuda(index) = self.device {
            if let Some(memory) = super::cuda_stats::read(index) {
                shared.counters.record_cuda_memory(memory);
            }
        }
    }

    /// `predict`, or the failure a test armed for this inference.
    fn predict_or_fault(
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
    model.record_cuda_memory(&shared);
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
        model.record_cuda_memory(&shared);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_choices() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn parses_precisions_and_warm_sizes() {
        assert_eq!("BF16".parse(), Ok(Precision::Bf16));
        assert_eq!("half".parse(), Ok(Precision::Fp16));
        assert_eq!(Precision::Auto.resolve(Device::Cpu), Ok(Precision::Fp32));
        assert_eq!(Precision::Auto.resolve(Device::Cuda(0)), Ok(Precision::Fp16));
        assert!(Precision::Fp16.resolve(Device::Cpu).unwrap_err().contains("bf16"));
        assert_eq!(Precision::Fp16.resolve(Device::Cuda(0)), Ok(Precision::Fp16));
        assert!("fp8".parse::<Precision>().is_err());
        assert_eq!("1242x375".parse(), Ok(ImageSize { width: 1242, height: 375 }));
        assert_eq!(" 960X512 ".parse::<ImageSize>().unwrap().to_string(), "960x512");
        for bad in ["1242", "0x5", "ax3", "100000x100000"] {
            assert!(bad.parse::<ImageSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_format_auto_means_channels_last() {
        assert_eq!("channels-last".parse(), Ok(MemoryFormat::ChannelsLast));
        assert_eq!("CONTIGUOUS".parse(), Ok(MemoryFormat::Contiguous));
        assert!("nchwc".parse::<MemoryFormat>().is_err());
        assert_eq!(MemoryFormat::Auto.resolve(Device::Cpu), MemoryFormat::ChannelsLast);
        assert_eq!(MemoryFormat::Auto.resolve(Device::Cuda(0)), MemoryFormat::ChannelsLast);
        assert_eq!(MemoryFormat::Contiguous.resolve(Device::Cpu), MemoryFormat::Contiguous);
    }
}
