//! Speed of the Rust paths, for `models/bench.py` (which adds the Python ones):
//! (c) the engine alone, no HTTP, and (d) the full HTTP path against the real
//! server binary with 1, 4 and 16 concurrent clients.
//!
//! `cargo bench --bench speed -- --device cpu --size 256x512 --iters 5
//!  --left L.png --right R.png [--server-bin PATH] [--clients 1,4,16]
//!  [--requests-per-client 2] [--json OUT]`
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
use stereo_recon::decode::decode_rgb;
use stereo_recon::engine::{DeviceChoice, Engine, EngineConfig, Precision, StereoPair};

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
    json: Option<PathBuf>,
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
        json: None,
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
            "--clients" => o.clients = value().split(',').map(|c| c.parse().expect("--clients 1,4,16")).collect(),
            "--requests-per-client" => o.requests_per_client = value().parse().expect("N"),
            "--json" => o.json = Some(value().into()),
            "--memory-format" => o.memory_format = value(),
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
    let device: DeviceChoice = o.device.parse().expect("--device");
    let (left_png, right_png) = load_pair(&o);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // (c) The engine alone: decoded pair in, disparity out, no HTTP.
    let engine_result = runtime.block_on(async {
        let config = EngineConfig {
            model_path: o.model.clone(),
            device,
            queue_depth: 1,
            threads: 0,
            memory_format: o.memory_format.parse().expect("--memory-format"),
            precision: Precision::Auto,
            warm_sizes: Vec::new(),
            faults: None,
        };
        let engine = Engine::start(config).unwrap();
        let info = engine.wait_ready().await.expect("model loads");
        let pair = StereoPair::new(decode_rgb(&left_png, u64::MAX).unwrap(), decode_rgb(&right_png, u64::MAX).unwrap())
            .unwrap();
        // Two untimed passes at this size, as models/bench.py does for (a) and (b): cuDNN
        // autotuning and allocator growth, then TorchScript's profiling executor optimising.
        for _ in 0..2 {
            engine.predict(pair.clone()).await.unwrap();
        }
        let watch = MemoryWatch::start(std::process::id(), gpu);
        let (mut total, mut inference) = (Vec::new(), Vec::new());
        for _ in 0..o.iters {
            let started = Instant::now();
            let prediction = engine.predict(pair.clone()).await.unwrap();
            total.push(started.elapsed().as_secs_f64() * 1000.0);
            inference.push(prediction.inference.as_secs_f64() * 1000.0);
        }
        let peak = watch.stop();
        json!({ "device": info.device, "latency_ms": stats_ms(total), "engine_thread_ms": stats_ms(inference),
                "peak_memory_mib": peak, "memory_kind": if gpu { "gpu" } else { "rss" } })
    });

    // (d) The whole HTTP path against the real server binary.
    let args: Vec<String> = ["--device", &o.device, "--queue-depth", "64", "--memory-format", &o.memory_format]
        .map(String::from)
        .into_iter()
        .chain(["--model".into(), o.model.display().to_string()])
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
    // A second untimed request, as for the engine above (the profiling executor's pass).
    assert_eq!(load(1, 1).count(200), 1, "warm-up request failed");
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

    let result = json!({
        "size": [o.height, o.width],
        "device": o.device,
        "iters": o.iters,
        "rust_engine": engine_result,
        "http": http,
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    if let Some(path) = &o.json {
        std::fs::write(path, format!("{text}\n")).unwrap();
    }
    println!("{text}");
}
