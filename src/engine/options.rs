//! How the engine is configured: the device, the weights' layout, the number
//! format (with the CPU probe that refuses bf16 where it would crawl) and the
//! warm-up sizes. Parsed from the command line; knows nothing of the engine loop.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

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
    pub(super) fn resolve(self) -> Result<Device, String> {
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
    pub(super) fn resolve(self, device: Device) -> MemoryFormat {
        match (self, device) {
            (MemoryFormat::Auto, _) => MemoryFormat::ChannelsLast,
            (chosen, _) => chosen,
        }
    }

    pub(super) fn name(self) -> &'static str {
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
    pub(super) fn resolve(self, device: Device) -> Result<Precision, String> {
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

    pub(super) fn kind(self) -> Kind {
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
pub(super) fn check_cpu_bf16_speed() -> Result<(), String> {
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
