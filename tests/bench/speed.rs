//! Speed of the Rust paths, for `models/bench.py` (which adds the Python ones):
//! (c) the engine alone, no HTTP, and (d) the full HTTP path against the real
//! server binary with 1, 4 and 16 concurrent clients.
//!
//! `cargo bench --bench speed -- --device cpu --size 256x512 --iters 5
//!  --left L.png --right R.png [--server-bin PATH] [--clients 1,4,16]
//!  [--requests-per-client 2] [--server-args "--precision fp16 ..."]
//!  [--variants "precision=fp32,graphs=0,pinned=off;precision=fp16"] [--json OUT]
//!  [--passes-on-stdin]`
//!
//! `--passes-on-stdin` makes it a timing peer for another program (`models/peers.py`,
//! which interleaves it with the other runtimes round by round): after loading and the
//! untimed passes it prints `ready`, then runs one timed pass per line read from stdin
//! and prints the engine thread's milliseconds, until stdin ends.
//!
//! (c) runs the engine as `serve` configures it by default. `--variants` adds
//! an A/B of engine configurations in the same run: every variant is loaded
//! at once and their timed passes are interleaved round by round, so a slow
//! spell of the machine hits all of them alike. Keys: precision, memory
//! (contiguous, channels-last, auto), graphs (shapes kept, 0 = off), pinned
//! (on, off); unnamed keys keep the default. Each variant's disparity is
//! compared with the first variant of the same precision (max |difference|).
//!
//! Prints one JSON document (also written to `--json`). Memory: peak RSS from
//! /proc on CPU; on CUDA, the process's peak GPU memory sampled with
//! `nvidia-smi` every 100 ms (libtorch's allocator statistics are not exposed
//! through tch).

#[path = "../common/loadgen.rs"]
mod loadgen;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadgen::{multipart, ServerProcess};
use serde_json::json;
use stereo_recon::config::Cli;
use stereo_recon::decode::decode_rgb;
use stereo_recon::engine::{buffer_pool, Engine, EngineConfig, ModelInfo, Prediction, StereoPair};

struct Options {
    device: String,
    width: u32,
    height: u32,
    iters: usize,
    left: PathBuf,
    right: PathBuf,
    model: PathBuf,
    server_bin: PathBuf,
    clients: Vec<usize>,
    requests_per_client: usize,
    memory_format: String,
    server_args: Vec<String>,
    variants: Vec<String>,
    json: Option<PathBuf>,
    passes_on_stdin: bool,
}

fn options() -> Options {
    let mut o = Options {
        device: "cpu".into(),
        width: 512,
        height: 256,
        iters: 5,
        left: "data/synthetic/left.png".into(),
        right: "data/synthetic/right.png".into(),
        model: std::env::var("STEREO_RECON_MODEL").unwrap_or_else(|_| "models/psmnet_kitti2015.pt".into()).into(),
        server_bin: std::env::var_os("STEREO_RECON_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stereo-recon"))),
        clients: vec![1, 4, 16],
        requests_per_client: 2,
        memory_format: "auto".into(),
        server_args: Vec::new(),
        variants: Vec::new(),
        json: None,
        passes_on_stdin: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--device" => o.device = value(),
            "--size" => {
                let v = value();
                let (h, w) = v.split_once('x').expect("--size HxW");
                (o.height, o.width) = (h.parse().expect("height"), w.parse().expect("width"));
            }
            "--iters" => o.iters = value().parse().expect("--iters N"),
            "--left" => o.left = value().into(),
            "--right" => o.right = value().into(),
            "--model" => o.model = value().into(),
            "--server-bin" => o.server_bin = value().into(),
            "--clients" => {
                // An empty list skips the HTTP part.
                o.clients =
                    value().split(',').filter(|c| !c.is_empty()).map(|c| c.parse().expect("--clients 1,4,16")).collect()
            }
            "--requests-per-client" => o.requests_per_client = value().parse().expect("N"),
            "--json" => o.json = Some(value().into()),
            "--memory-format" => o.memory_format = value(),
            "--server-args" => o.server_args = value().split_whitespace().map(String::from).collect(),
            "--variants" => {
                o.variants = value().split(';').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect()
            }
            "--passes-on-stdin" => o.passes_on_stdin = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// Peak memory of a process while something runs: resident memory on CPU,
/// GPU memory (nvidia-smi) on CUDA. In MiB.
struct MemoryWatch {
    running: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn gpu_mib(pid: u32) -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_gpu_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
        let (p, mib) = line.split_once(',')?;
        (p.trim().parse::<u32>().ok()? == pid).then(|| mib.trim().parse().ok())?
    })
}

impl MemoryWatch {
    fn start(pid: u32, gpu: bool) -> MemoryWatch {
        if !gpu && pid == std::process::id() {
            // Reset this process's high-water mark so the peak is this phase's.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        let running = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (running, peak) = (running.clone(), peak.clone());
            std::thread::spawn(move || {
                while running.load(Ordering::Relaxed) {
                    let sample = if gpu { gpu_mib(pid) } else { loadgen::rss_kib(pid).map(|k| k / 1024) };
                    if let Some(mib) = sample {
                        peak.fetch_max(mib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        MemoryWatch { running, peak, thread: Some(thread) }
    }

    fn stop(mut self) -> u64 {
        self.running.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn stats_ms(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    let pick = |p: f64| samples[((p / 100.0) * (samples.len() - 1) as f64).round() as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    json!({ "n": samples.len(), "mean": mean, "p50": pick(50.0), "p95": pick(95.0), "p99": pick(99.0), "min": samples[0] })
}

/// The pair, resized to the benchmark size (content is realistic, size exact).
fn load_pair(o: &Options) -> (Vec<u8>, Vec<u8>) {
    let resize = |path: &PathBuf| {
        let image = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let resized = image.resize_exact(o.width, o.height, image::imageops::FilterType::Triangle).to_rgb8();
        let mut out = std::io::Cursor::new(Vec::new());
        resized.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    (resize(&o.left), resize(&o.right))
}

fn main() {
    let o = options();
    let gpu = o.device.starts_with("cuda");
    let (left_png, right_png) = load_pair(&o);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // (c) The engine alone: decoded pair in, disparity out, no HTTP, as `serve` configures it.
    let pair =
        StereoPair::new(decode_rgb(&left_png, u64::MAX).unwrap(), decode_rgb(&right_png, u64::MAX).unwrap()).unwrap();
    if o.passes_on_stdin {
        return runtime.block_on(passes_on_stdin(&o, pair));
    }
    let engine_result = runtime.block_on(async {
        let (engine, info) = warmed_engine(&o, "", &pair).await;
        let watch = MemoryWatch::start(std::process::id(), gpu);
        let (mut total, mut inference, mut phases) = (Vec::new(), Vec::new(), Phases::default());
        for _ in 0..o.iters {
            let started = Instant::now();
            let prediction = engine.predict(pair.clone()).await.unwrap();
            total.push(started.elapsed().as_secs_f64() * 1000.0);
            inference.push(prediction.inference.as_secs_f64() * 1000.0);
            phases.push(&prediction);
        }
        let peak = watch.stop();
        json!({ "device": info.device, "precision": info.precision, "memory_format": info.memory_format,
                "latency_ms": stats_ms(total), "engine_thread_ms": stats_ms(inference), "phases_ms": phases.json(),
                "peak_memory_mib": peak, "memory_kind": if gpu { "gpu" } else { "rss" },
                "buffer_pool": buffer_pool::stats().map(|s| json!({
                    "in_use_mib": s.in_use_bytes >> 20, "extent_mib": s.extent_bytes >> 20,
                    "high_water_mib": s.high_water_bytes >> 20, "reused": s.reused, "grown": s.grown })) })
    });
    let variants = (!o.variants.is_empty()).then(|| runtime.block_on(engine_variants(&o, &pair)));

    // (d) The whole HTTP path against the real server binary (skipped with `--clients ""`).
    let http = if o.clients.is_empty() { Vec::new() } else { http_rows(&o, &runtime, left_png, right_png, gpu) };

    let result = json!({
        "size": [o.height, o.width],
        "device": o.device,
        "iters": o.iters,
        "rust_engine": engine_result,
        "engine_variants": variants,
        "http": http,
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    if let Some(path) = &o.json {
        std::fs::write(path, format!("{text}\n")).unwrap();
    }
    println!("{text}");
}

/// One timed pass per line of stdin, its engine-thread milliseconds printed as a
/// line, after `ready`: the other program decides when each pass runs.
async fn passes_on_stdin(o: &Options, pair: StereoPair) {
    use std::io::{BufRead, Write};
    let (engine, _) = warmed_engine(o, "", &pair).await;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").and_then(|()| stdout.flush()).expect("stdout");
    for line in std::io::stdin().lock().lines() {
        line.expect("stdin");
        let prediction = engine.predict(pair.clone()).await.unwrap();
        writeln!(stdout, "{:.3}", prediction.inference.as_secs_f64() * 1000.0)
            .and_then(|()| stdout.flush())
            .expect("stdout");
    }
}

/// The engine of `variant` ("" for `serve`'s configuration), loaded, after the
/// untimed passes at this size that models/bench.py also runs for (a) and (b):
/// cuDNN autotuning and allocator growth, TorchScript's profiling executor
/// optimising, then (on CUDA) recording the shape's graph.
async fn warmed_engine(o: &Options, variant: &str, pair: &StereoPair) -> (Engine, Arc<ModelInfo>) {
    let engine = Engine::start(engine_config(o, variant)).unwrap();
    let info =
        engine.wait_ready().await.unwrap_or_else(|e| panic!("variant {variant:?}: the model does not load: {e}"));
    for _ in 0..3 {
        engine.predict(pair.clone()).await.unwrap();
    }
    (engine, info)
}

/// The engine configuration `serve` would use with these options, then the
/// variant's changes (`key=value` pairs, comma-separated).
fn engine_config(o: &Options, variant: &str) -> EngineConfig {
    // Flag and value pairs; a later setting of a flag replaces an earlier one.
    let mut flags: Vec<(String, String)> = vec![
        ("--device".into(), o.device.clone()),
        ("--memory-format".into(), o.memory_format.clone()),
        ("--model".into(), o.model.display().to_string()),
    ];
    let mut set = |flag: &str, value: &str| match flags.iter_mut().find(|(f, _)| f == flag) {
        Some(entry) => entry.1 = value.to_owned(),
        None => flags.push((flag.to_owned(), value.to_owned())),
    };
    for pair in o.server_args.chunks(2) {
        set(&pair[0], pair.get(1).map(String::as_str).unwrap_or_default());
    }
    let mut pinned = true;
    for setting in variant.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = setting.split_once('=').unwrap_or_else(|| panic!("variant setting {setting}: key=value"));
        match key {
            "precision" => set("--precision", value),
            "memory" => set("--memory-format", value),
            "graphs" => set("--cuda-graphs", value),
            "pinned" => pinned = matches!(value, "on" | "true" | "1"),
            other => panic!("unknown variant key {other}"),
        }
    }
    let args: Vec<String> = ["stereo-recon", "serve"]
        .map(String::from)
        .into_iter()
        .chain(flags.into_iter().flat_map(|(f, v)| [f, v]))
        .collect();
    let Cli { command: stereo_recon::config::Command::Serve(config), .. } =
        <Cli as clap::Parser>::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    else {
        unreachable!("parsed as serve")
    };
    EngineConfig { pinned_staging: pinned, ..config.model.engine_config(1) }
}

/// Per-phase times of the engine thread (upload, forward, download), in ms.
#[derive(Default)]
struct Phases {
    upload: Vec<f64>,
    forward: Vec<f64>,
    download: Vec<f64>,
}

impl Phases {
    fn push(&mut self, prediction: &Prediction) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.upload.push(ms(prediction.phases.upload));
        self.forward.push(ms(prediction.phases.forward));
        self.download.push(ms(prediction.phases.download));
    }

    fn json(self) -> serde_json::Value {
        json!({ "upload": stats_ms(self.upload), "forward": stats_ms(self.forward), "download": stats_ms(self.download) })
    }
}

/// The A/B of `--variants`: all loaded at once, timed passes interleaved.
async fn engine_variants(o: &Options, pair: &StereoPair) -> serde_json::Value {
    let mut engines = Vec::new();
    for variant in &o.variants {
        let (engine, info) = warmed_engine(o, variant, pair).await;
        let first = engine.predict(pair.clone()).await.unwrap().disparity;
        engines.push((variant, info, engine, first, Vec::new(), Phases::default()));
    }
    for _ in 0..o.iters {
        for (_, _, engine, _, total, phases) in engines.iter_mut() {
            let started = Instant::now();
            let prediction = engine.predict(pair.clone()).await.unwrap();
            total.push(started.elapsed().as_secs_f64() * 1000.0);
            phases.push(&prediction);
        }
    }
    let firsts: Vec<(String, String, Vec<f32>)> =
        engines.iter().map(|e| (e.0.clone(), e.1.precision.clone(), e.3.values().to_vec())).collect();
    let mut rows = Vec::new();
    for (variant, info, _, first, total, phases) in engines {
        // The first variant of the same precision (itself when it is the first).
        let (reference, _, values) = firsts.iter().find(|f| f.1 == info.precision).expect("itself at least");
        let max_diff = first.values().iter().zip(values).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        rows.push(json!({
            "variant": variant, "precision": info.precision, "memory_format": info.memory_format,
            "latency_ms": stats_ms(total), "phases_ms": phases.json(),
            "max_abs_diff_px_vs": reference, "max_abs_diff_px": max_diff,
        }));
    }
    serde_json::Value::Array(rows)
}

/// (d): the server binary under 1, 4 and 16 concurrent clients (`--clients`).
fn http_rows(
    o: &Options,
    runtime: &tokio::runtime::Runtime,
    left_png: Vec<u8>,
    right_png: Vec<u8>,
    gpu: bool,
) -> Vec<serde_json::Value> {
    let args: Vec<String> = ["--device", &o.device, "--queue-depth", "64", "--memory-format", &o.memory_format]
        .map(String::from)
        .into_iter()
        .chain(["--model".into(), o.model.display().to_string()])
        .chain(o.server_args.iter().cloned())
        .collect();
    let mut server = ServerProcess::start(&o.server_bin, &args, Path::new("."));
    let address = server.address;
    let (content_type, body) = multipart(&[("left", &left_png), ("right", &right_png)]);
    let body = Arc::new(body);
    let load = |clients: usize, requests: usize| {
        runtime.block_on(loadgen::run(loadgen::LoadConfig {
            address,
            path: "/api/v1/disparity?format=png16".into(),
            content_type: content_type.clone(),
            body: body.clone(),
            clients,
            duration: Duration::from_secs(3600),
            max_requests: requests,
            backoff_after_503: Duration::from_millis(100),
            request_timeout: Duration::from_secs(600),
        }))
    };
    // Wait for health through a request that must succeed, and warm this size.
    let ready_by = Instant::now() + Duration::from_secs(300);
    while load(1, 1).count(200) != 1 {
        assert!(Instant::now() < ready_by, "server not ready");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Two more untimed requests, as for the engine above (the profiling executor's pass,
    // then recording the shape's CUDA graph).
    assert_eq!(load(1, 2).count(200), 2, "warm-up requests failed");
    let mut http = Vec::new();
    for &clients in &o.clients {
        let watch = MemoryWatch::start(server.pid(), gpu);
        let report = load(clients, clients * o.requests_per_client);
        let peak = watch.stop();
        let failures = report.outcomes.len() - report.count(200);
        assert_eq!(failures, 0, "{clients} clients: not every request succeeded: {:?}", report.statuses());
        http.push(json!({
            "clients": clients,
            "requests": report.outcomes.len(),
            "throughput_per_s": report.throughput(),
            "latency_ms": stats_ms(report.latencies(200).iter().map(|d| d.as_secs_f64() * 1000.0).collect()),
            "peak_memory_mib": peak,
        }));
    }
    let exit = server.terminate(Duration::from_secs(60));
    assert!(exit.success(), "server exit {exit}");

    http
}
