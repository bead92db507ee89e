//! Load test: the real server binary under concurrent clients, on loopback.
//!
//! `cargo bench --bench load -- [--clients 8] [--seconds 60] [--queue-depth 2]
//! [--size 64x48] [--format png16] [--server-bin PATH] [--json target/load-report.json]`
//!
//! Starts `stereo-recon serve` on 127.0.0.1 (port chosen by the OS) on CPU,
//! waits for it to be healthy, then runs N clients for the given time, each
//! posting a small textured pair as fast as it is answered (after a 503 it waits
//! 100 ms). It prints throughput, latency percentiles per status, the status
//! codes seen, the server's resident memory before, at peak and after, and its
//! thread count before and at peak (CPU work runs on one bounded pool, so it
//! must not grow with the clients);
//! then stops the server with SIGTERM and checks it exits 0. Bounded in time,
//! clients and requests; it talks to nothing but the server it started.

#[path = "../common/loadgen.rs"]
mod loadgen;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadgen::{multipart, rss_kib, thread_count, LoadConfig, ServerProcess};

struct Options {
    clients: usize,
    seconds: u64,
    queue_depth: usize,
    width: u32,
    height: u32,
    /// The answer format asked (`json` makes the server encode several images per answer).
    format: String,
    /// The server binary (another build, to compare).
    server_bin: PathBuf,
    json: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        clients: 8,
        seconds: 60,
        queue_depth: 2,
        width: 64,
        height: 48,
        format: "png16".into(),
        server_bin: PathBuf::from(env!("CARGO_BIN_EXE_stereo-recon")),
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => o.clients = value().parse().expect("--clients N"),
            "--seconds" => o.seconds = value().parse().expect("--seconds N"),
            "--queue-depth" => o.queue_depth = value().parse().expect("--queue-depth N"),
            "--size" => {
                let v = value();
                let (w, h) = v.split_once('x').expect("--size WxH");
                (o.width, o.height) = (w.parse().expect("width"), h.parse().expect("height"));
            }
            "--json" => o.json = Some(PathBuf::from(value())),
            "--format" => o.format = value(),
            "--server-bin" => o.server_bin = PathBuf::from(value()),
            "--bench" => {} // cargo bench passes this
            other => panic!("unknown option {other}"),
        }
    }
    o
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn crop_png(source: &image::RgbImage, x: u32, w: u32, h: u32) -> Vec<u8> {
    let crop = image::imageops::crop_imm(source, x, 150, w, h).to_image();
    let mut out = std::io::Cursor::new(Vec::new());
    crop.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()))
}

fn main() {
    let o = options();
    let model = std::env::var("STEREO_RECON_MODEL").unwrap_or_else(|_| "models/psmnet_kitti2015.pt".into());
    let args: Vec<String> =
        ["--device", "cpu", "--model", &model, "--queue-depth", &o.queue_depth.to_string()].map(String::from).into();
    let mut server = ServerProcess::start(&o.server_bin, &args, &repo());
    let (pid, address) = (server.pid(), server.address);
    let ready_by = Instant::now() + Duration::from_secs(120);
    while http_get(address, "/api/v1/health").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < ready_by, "server not healthy in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_before = rss_kib(pid).unwrap_or(0);
    let threads_before = thread_count(pid).unwrap_or(0);

    // Peak memory and threads, sampled every 100 ms while the load runs.
    let peak = Arc::new(AtomicU64::new(rss_before));
    let peak_threads = Arc::new(AtomicU64::new(threads_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, peak_threads, sampling) = (peak.clone(), peak_threads.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                if let Some(threads) = thread_count(pid) {
                    peak_threads.fetch_max(threads, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let source = image::open(repo().join("data/synthetic/left.png")).expect("sample image").to_rgb8();
    let (content_type, body) = multipart(&[
        ("left", &crop_png(&source, 100, o.width, o.height)),
        ("right", &crop_png(&source, 106, o.width, o.height)),
    ]);
    println!(
        "load: {} clients, {} s, queue depth {} (capacity {}), {}x{} pairs as {}, server {} pid {pid} on {address}",
        o.clients,
        o.seconds,
        o.queue_depth,
        o.queue_depth + 1,
        o.width,
        o.height,
        o.format,
        o.server_bin.display()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(loadgen::run(LoadConfig {
        address,
        path: format!("/api/v1/disparity?format={}", o.format),
        content_type,
        body: Arc::new(body),
        clients: o.clients,
        duration: Duration::from_secs(o.seconds),
        max_requests: 1_000_000,
        backoff_after_503: Duration::from_millis(100),
        request_timeout: Duration::from_secs(120),
    }));
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    // Let the last admitted requests finish before reading memory again.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib(pid).unwrap_or(0);
    let (_, health) = http_get(address, "/api/v1/health").unwrap_or_default();

    let ms = |status: u16, p: f64| report.percentile_ms(status, p).map_or("-".into(), |v| format!("{v:.1}"));
    let timeouts = report.outcomes.iter().filter(|o| o.error.as_deref() == Some("timed out")).count();
    let errors = report.outcomes.iter().filter(|o| o.status == 0).count();
    println!("\n| status | count | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (status, count) in report.statuses() {
        println!(
            "| {status} | {count} | {} | {} | {} | {} |",
            ms(status, 50.0),
            ms(status, 95.0),
            ms(status, 99.0),
            ms(status, 100.0)
        );
    }
    let with_retry = report.outcomes.iter().filter(|o| o.status == 503 && o.retry_after.is_some()).count();
    println!("\nthroughput: {:.2} answered pairs/s over {:.1} s", report.throughput(), report.elapsed.as_secs_f64());
    println!("503s with Retry-After: {with_retry} of {}", report.count(503));
    println!("timed out: {timeouts}; connection errors: {}", errors - timeouts);
    println!(
        "server RSS: {:.0} MiB before, {:.0} MiB peak, {:.0} MiB after",
        rss_before as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!("server threads: {threads_before} before, {} peak", peak_threads.load(Ordering::Relaxed));
    println!("server health after: {health}");

    let exit = server.terminate(Duration::from_secs(60));
    println!("server exit after SIGTERM: {exit}");

    if let Some(path) = o.json {
        let statuses: serde_json::Map<String, serde_json::Value> =
            report.statuses().into_iter().map(|(s, n)| (s.to_string(), n.into())).collect();
        let json = serde_json::json!({
            "clients": o.clients, "seconds": o.seconds, "queue_depth": o.queue_depth,
            "size": [o.width, o.height],
            "throughput_per_s": report.throughput(),
            "statuses": statuses,
            "latency_ms": {
                "200": {"p50": report.percentile_ms(200, 50.0), "p99": report.percentile_ms(200, 99.0)},
                "503": {"p50": report.percentile_ms(503, 50.0), "p99": report.percentile_ms(503, 99.0)},
            },
            "timeouts": timeouts,
            "rss_kib": {"before": rss_before, "peak": peak.load(Ordering::Relaxed), "after": rss_after},
            "threads": {"before": threads_before, "peak": peak_threads.load(Ordering::Relaxed)},
            "format": o.format,
            "exit_ok": exit.success(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
        println!("wrote {}", path.display());
    }
    let bad = report.outcomes.iter().filter(|o| o.status != 200 && o.status != 503).count();
    if bad > 0 || !exit.success() || with_retry != report.count(503) {
        eprintln!("FAILED: {bad} answers were neither 200 nor 503, or the server did not exit cleanly");
        std::process::exit(1);
    }
}
