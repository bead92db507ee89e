//! Command line and environment configuration (one clap tree; every option
//! also reads an environment variable, which is how the Docker image is set up).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::{DeviceChoice, EngineConfig, ImageSize, MemoryFormat, Precision};

/// PSMNet stereo disparity: a web service, and the same engine on the command line.
#[derive(Debug, Parser)]
#[command(name = "stereo-recon", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text (for people) or json (one object a line with the same fields, for log
    /// shippers). Logs go to stderr; RUST_LOG filters them.
    #[arg(long, env = "STEREO_RECON_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the upload page and the JSON API.
    Serve(Config),
    /// Compute the disparity of one rectified pair and write it to a file.
    Predict(PredictArgs),
    /// Measure accuracy on folders of pairs with ground truth (EPE, D1, bad-1/2/3).
    Eval(EvalArgs),
    /// Run whole datasets (KITTI, Middlebury, left/ + right/ folders) and stereo videos,
    /// with progress, resume, and shards for several machines.
    Batch(BatchArgs),
    /// Render the synthetic sample scene (images, exact disparity, calibration) into a folder.
    RenderSynthetic(RenderArgs),
    /// Check that the server in this container is ready (exit 0) or not (exit 1), for
    /// Docker's HEALTHCHECK and Kubernetes exec probes: no shell or curl needed.
    Healthcheck(HealthcheckArgs),
}

/// `healthcheck`: which server, which route.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// Port on 127.0.0.1 to check. Default: the port the server process (--server-pid)
    /// really listens on, read from /proc; if that cannot be read, the port `serve`
    /// would take from this environment (STEREO_RECON_PORT, else 5000).
    #[arg(long, env = "STEREO_RECON_HEALTHCHECK_PORT")]
    pub port: Option<u16>,
    /// The server's process ID (PID 1, the entrypoint, in a container).
    #[arg(long, env = "STEREO_RECON_HEALTHCHECK_SERVER_PID", default_value_t = 1)]
    pub server_pid: u32,
    /// Route to ask; healthy when it answers 200.
    #[arg(long, env = "STEREO_RECON_HEALTHCHECK_PATH", default_value = "/api/v1/health")]
    pub path: String,
    /// Seconds to wait for the connection and the answer.
    #[arg(long, env = "STEREO_RECON_HEALTHCHECK_TIMEOUT_SECS", default_value_t = 3)]
    pub timeout_secs: u64,
}

impl HealthcheckArgs {
    /// The check, with the fallback address `serve` would use in this environment.
    pub fn check(&self) -> crate::healthcheck::Check {
        let fallback = match Cli::try_parse_from(["stereo-recon", "serve"]) {
            Ok(Cli { command: Command::Serve(config), .. }) => std::net::SocketAddr::new(config.host, config.port),
            _ => std::net::SocketAddr::from(([127, 0, 0, 1], 5000)),
        };
        crate::healthcheck::Check {
            port: self.port,
            server_pid: self.server_pid,
            fallback,
            path: self.path.clone(),
            timeout: std::time::Duration::from_secs(self.timeout_secs.max(1)),
        }
    }
}

/// Where the model is and how it runs; shared by every command that infers.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// TorchScript model produced by the set-up (its .json metadata must sit beside it).
    #[arg(long = "model", env = "STEREO_RECON_MODEL", default_value = "models/psmnet_kitti2015.pt")]
    pub model_path: PathBuf,
    /// Device to run on: auto (CUDA when usable, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "STEREO_RECON_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// libtorch CPU threads for one inference; 0 uses every core.
    #[arg(long, env = "STEREO_RECON_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Layout of the convolution weights: auto (channels-last: NHWC / NDHWC, faster on CPU and
    /// CUDA), contiguous or channels-last.
    #[arg(long, env = "STEREO_RECON_MEMORY_FORMAT", default_value = "auto")]
    pub memory_format: MemoryFormat,
    /// Number format of the network: fp32, bf16, fp16 or auto (fp32 on the CPU, where bf16 is
    /// no faster; fp16 on CUDA: fastest, EPE within 0.01 px of fp32). The final soft-argmin
    /// always runs in fp32.
    #[arg(long, env = "STEREO_RECON_PRECISION", default_value = "auto")]
    pub precision: Precision,
    /// CUDA only: how many input shapes (padded sizes) keep a recorded CUDA graph of the
    /// network, replayed with one launch from the third request at a shape on; each holds
    /// about one forward pass of GPU memory. 0 turns CUDA graphs off.
    #[arg(long, env = "STEREO_RECON_CUDA_GRAPHS", default_value_t = 2)]
    pub cuda_graphs: usize,
    /// CPU only: keep the memory of large tensors for the next pass instead of returning it to
    /// the system after every tensor (passes repeat the same sizes). The process then holds
    /// about one pass's working memory while idle; `false` gives it back after every tensor.
    #[arg(long, env = "STEREO_RECON_CPU_BUFFER_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_buffer_pool: bool,
}

impl Config {
    /// The connection-level limits of `serve`.
    pub fn connection_limits(&self) -> crate::server::ConnectionLimits {
        let secs = std::time::Duration::from_secs;
        crate::server::ConnectionLimits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: secs(self.header_read_timeout_secs.max(1)),
            idle_timeout: secs(self.idle_timeout_secs.max(1)),
            write_timeout: secs(self.write_timeout_secs.max(1)),
            shutdown_timeout: secs(self.shutdown_timeout_secs),
            max_body_bytes: self.max_upload_bytes as u64,
        }
    }
}

impl ModelArgs {
    pub fn engine_config(&self, queue_depth: usize) -> EngineConfig {
        EngineConfig {
            model_path: self.model_path.clone(),
            device: self.device,
            queue_depth,
            threads: self.threads,
            memory_format: self.memory_format,
            precision: self.precision,
            warm_sizes: Vec::new(),
            cuda_graphs: self.cuda_graphs,
            pinned_staging: true,
            cpu_buffer_pool: self.cpu_buffer_pool,
            faults: None,
        }
    }
}

/// Server configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "STEREO_RECON_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// TCP port to listen on.
    #[arg(long, env = "STEREO_RECON_PORT", default_value_t = 5000)]
    pub port: u16,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Largest request body in bytes (both images; base64 JSON counts encoded).
    #[arg(long, env = "STEREO_RECON_MAX_UPLOAD_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_upload_bytes: usize,
    /// Largest image in pixels (width x height), per image. Memory grows with
    /// it: PSMNet's cost volume needs about 3 KB per pixel at the full 192 disparities.
    #[arg(long, env = "STEREO_RECON_MAX_PIXELS", default_value_t = 2_100_000)]
    pub max_pixels: u64,
    /// Seconds a client may take to upload its request body; slower uploads get 408.
    #[arg(long, env = "STEREO_RECON_UPLOAD_TIMEOUT_SECS", default_value_t = 60)]
    pub upload_timeout_secs: u64,
    /// Requests allowed to wait while one is computed; further requests get 503 at once.
    #[arg(long, env = "STEREO_RECON_QUEUE_DEPTH", default_value_t = 4)]
    pub queue_depth: usize,
    /// Threads of the one pool that decodes and encodes every request's images (0: one per
    /// core); requests never start threads of their own.
    #[arg(long, env = "STEREO_RECON_CPU_THREADS", default_value_t = 0)]
    pub cpu_threads: usize,
    /// Image sizes (WIDTHxHEIGHT, comma-separated) to run once before health turns ready, so
    /// the first request at each does not pay cuDNN autotuning or the first TorchScript runs.
    #[arg(long, env = "STEREO_RECON_WARM_SIZES", value_delimiter = ',', num_args = 0..)]
    pub warm_sizes: Vec<ImageSize>,
    /// Memory budget in bytes for uploads being received and decoded at once (each counts its
    /// declared length, then its decoded pixels); past it, requests get 503 before their body is read.
    #[arg(long, env = "STEREO_RECON_MAX_INFLIGHT_BYTES", default_value_t = 1 << 30)]
    pub max_inflight_bytes: u64,
    /// Browser origins (scheme://host[:port], comma-separated, or *) whose pages may call the API.
    /// The page's own origin always may; other origins are refused with 403.
    #[arg(long, env = "STEREO_RECON_CORS_ALLOW_ORIGIN", value_delimiter = ',', num_args = 0..)]
    pub cors_allow_origin: Vec<String>,
    /// Require `Authorization: Bearer KEY` on every route but health, readiness, metrics and the
    /// page's own files (comma-separated for several keys; at least 16 characters each). Prefer
    /// --api-key-file, which keeps keys out of process listings. Off by default.
    #[arg(long = "api-key", env = "STEREO_RECON_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one a line (blank lines and # comments skipped), added to --api-key.
    #[arg(long, env = "STEREO_RECON_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// WebSocket streams (/api/v1/stream) open at once at most; beyond it the handshake gets 503.
    #[arg(long, env = "STEREO_RECON_MAX_STREAMS", default_value_t = 8)]
    pub max_streams: usize,
    /// Seconds a stream may send nothing before the server closes it (close code 1001).
    #[arg(long, env = "STEREO_RECON_STREAM_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub stream_idle_timeout_secs: u64,
    /// Open connections at most. At the cap a new connection closes the oldest one that has no
    /// request in progress (slow or idle); only when all are busy is it refused with 503.
    /// Keep it under the process's open-files limit (`ulimit -n`).
    #[arg(long, env = "STEREO_RECON_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head (line and headers), from connecting or,
    /// on a kept-alive connection, from the head's first byte; a silent connection is closed.
    #[arg(long, env = "STEREO_RECON_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "STEREO_RECON_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Seconds an answer may go unread (no write progress) before its connection is dropped.
    #[arg(long, env = "STEREO_RECON_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,
    /// On SIGTERM: idle connections close at once; requests in flight get this many seconds
    /// to finish, then are cut. Keep it below the orchestrator's grace period (Kubernetes: 30).
    #[arg(long, env = "STEREO_RECON_SHUTDOWN_TIMEOUT_SECS", default_value_t = 25)]
    pub shutdown_timeout_secs: u64,
    /// Folder with the page's CSS and JavaScript.
    #[arg(long, env = "STEREO_RECON_STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,
    /// Folder with the sample pairs offered on the page.
    #[arg(long, env = "STEREO_RECON_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

/// `predict`: one pair through the same engine as the server.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// Left image of the pair (rectified, unless --calib says otherwise).
    pub left: PathBuf,
    /// Right image of the pair.
    pub right: PathBuf,
    /// Output file: .pfm writes float32 PFM, .png writes a KITTI 16-bit PNG.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also write a colourised PNG here, for looking at.
    #[arg(long)]
    pub color: Option<PathBuf>,
    /// Calibration of the pair (our JSON, OpenCV YAML, KITTI or Middlebury calib.txt). An
    /// unrectified pair is rectified first; outputs then refer to the rectified left image.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// With --calib: write depth here (.pfm float32 in the calibration's units, .png 16-bit mm).
    #[arg(long, requires = "calib")]
    pub depth: Option<PathBuf>,
    /// With --calib: write the coloured point cloud here (binary PLY, left camera frame; with
    /// --uncertainty or --max-uncertainty each point also carries sigma_disparity and sigma_depth).
    #[arg(long, requires = "calib")]
    pub ply: Option<PathBuf>,
    /// With --calib: leave out points farther than this (calibration units).
    #[arg(long, requires = "calib")]
    pub max_depth: Option<f64>,
    /// Also write the disparity's per-pixel standard deviation here (float32 PFM, px): how
    /// far to trust each value.
    #[arg(long)]
    pub uncertainty: Option<PathBuf>,
    /// Mark every pixel whose standard deviation is above this many px as having no value, in
    /// every output (0 in a KITTI PNG, +inf in a PFM, left out of depth and the point cloud).
    #[arg(long)]
    pub max_uncertainty: Option<f32>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `render-synthetic`: regenerate the sample scene shipped in `data/`.
#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Folder to write left.png, right.png, disp_gt.pfm and the calibration files into.
    pub output: PathBuf,
}

/// `eval`: accuracy of the same engine on pairs with ground truth.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Dataset folders, any layout `batch` reads: KITTI (ground truth from disp_occ_0/ or
    /// disp_noc_0/), Middlebury scenes (disp0GT.pfm, scored where mask0nocc.png is 255), pair
    /// folders (left.*, right.*, disp_gt.pfm | disp_gt_kitti16.png | disp_gt.png), or folders
    /// holding any of these at any depth.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write each prediction (PFM, colour PNG) and its error map (KITTI colours) here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Scale of 8-bit ground-truth PNGs (disparity = value / scale) where a pair has no pair.json.
    #[arg(long)]
    pub gt_scale: Option<f32>,
    /// Ground truth at or beyond this disparity is excluded from the scores (and counted).
    #[arg(long, default_value_t = 192.0)]
    pub maxdisp: f32,
    /// Run the network on pairs downscaled by this factor (0.25 to 1) and score its
    /// disparity upscaled to the ground truth's size (bilinear, values divided by the factor):
    /// the accuracy a faster, smaller run costs.
    #[arg(long)]
    pub scale: Option<f32>,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub use crate::decode::VideoLayout;

/// `batch`: many pairs through one loaded engine, outputs mirrored under `--out`.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// Dataset folders (KITTI image_2/ + image_3/ or colored_0/ + colored_1/, Middlebury scenes
    /// with im0/im1, left/ + right/ folders, pair folders with left.* + right.*, or folders
    /// holding these), or stereo video files (with --layout).
    pub inputs: Vec<PathBuf>,
    /// Folder to write into: one subfolder per format (png16/, pfm/, color/, ...), files named
    /// after their pair (000046_10.png, frame_000123.pfm); one more level per input when
    /// several are given.
    #[arg(long)]
    pub out: PathBuf,
    /// What to write per pair, comma-separated: png16, pfm, color, uncertainty, depth,
    /// depth16, ply, depth_uncertainty, json.
    #[arg(long, value_delimiter = ',', default_value = "png16")]
    pub formats: Vec<String>,
    /// Layout of the stereo video files among the inputs.
    #[arg(long)]
    pub layout: Option<VideoLayout>,
    /// A stereo video stored as two files: the left view's file (with --right-video).
    #[arg(long, requires = "right_video")]
    pub left_video: Option<PathBuf>,
    /// The right view's file (with --left-video).
    #[arg(long, requires = "left_video")]
    pub right_video: Option<PathBuf>,
    /// Videos: take every N-th frame.
    #[arg(long, default_value_t = 1)]
    pub every: u64,
    /// Videos: start this many seconds in.
    #[arg(long)]
    pub start: Option<f64>,
    /// Videos: stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Videos: also write the colour disparity as a video at the source frame rate (.mp4,
    /// H.264). Needs every frame, so not with --shard.
    #[arg(long)]
    pub video_out: Option<PathBuf>,
    /// Calibration for every pair (our JSON, OpenCV YAML, KITTI or Middlebury calib.txt);
    /// without it, depth and points use each pair's own (KITTI calib_cam_to_cam/, Middlebury
    /// calib.txt, calib.json in a pair folder).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// With a calibration: leave out points farther than this (calibration units).
    #[arg(long)]
    pub max_depth: Option<f64>,
    /// Mark every pixel whose standard deviation is above this many px as having no value.
    #[arg(long)]
    pub max_uncertainty: Option<f32>,
    /// Run the network on pairs downscaled by this factor (0.25 to 1): outputs at the scaled
    /// size, disparities in its pixels; about 1 / scale^2 faster.
    #[arg(long)]
    pub scale: Option<f32>,
    /// Compute pairs whose outputs already exist again (default: skip them, so a stopped
    /// run resumes).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop at the first pair that fails (default: report it, go on, exit non-zero at the end).
    #[arg(long)]
    pub fail_fast: bool,
    /// Print one JSON line per pair on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// Only list the pairs this run (this shard) would take, whether each is already done,
    /// and exit: the model is not loaded.
    #[arg(long)]
    pub dry_run: bool,
    /// Process only the I-th of N disjoint slices of the pairs (I from 0), e.g. 0/4 .. 3/4 on
    /// four machines: pair k belongs to slice k mod N.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Pairs in flight at once (decoding, waiting for the engine, encoding and writing);
    /// 1 runs strictly one after the other.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub pipeline_depth: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `--shard I/N`: which slice of the pairs this run takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Whether the `k`-th pair of the whole list is this shard's.
    pub fn takes(self, k: u64) -> bool {
        k % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let bad = || format!("{text:?}: expected I/N with 0 <= I < N, e.g. 0/4");
        let (index, count) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (index.trim().parse().map_err(|_| bad())?, count.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}
