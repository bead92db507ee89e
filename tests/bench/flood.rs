//! Upload flood: `make flood` (docs/robustness.md). Starts the release server
//! on 127.0.0.1 and opens `--clients` connections that each announce a
//! `--mb` MB JSON body and send it slowly (`--chunk-kb` every 100 ms), as an
//! attacker holding memory would; samples the server's resident memory every
//! 100 ms and prints its peak, what each client was answered, and the memory
//! budget's verdicts. Bounded: `--seconds` at most, loopback only.
//!
//! `cargo bench --bench flood -- [--clients 60] [--mb 60] [--chunk-kb 256]
//!  [--seconds 20] [-- SERVER ARGS...]`
//!
//! With `--v2-pixels N`, each client instead sends at once an Open Inference
//! Protocol request whose two UINT8 inputs of N pixels are JSON numbers (the
//! largest form of a tensor body) and which names an unknown output, so the
//! server parses every value and then refuses it: the peak shows what parsing
//! tensor bodies holds, against the bytes the upload budget was charged.

#[path = "../common/loadgen.rs"]
mod loadgen;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadgen::ServerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let mut clients = 60usize;
    let mut mb = 60usize;
    let mut chunk_kb = 256usize;
    let mut seconds = 20u64;
    let mut v2_pixels = 0usize;
    let mut server_args: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => clients = value().parse().unwrap(),
            "--mb" => mb = value().parse().unwrap(),
            "--chunk-kb" => chunk_kb = value().parse().unwrap(),
            "--seconds" => seconds = value().parse().unwrap(),
            "--v2-pixels" => v2_pixels = value().parse().unwrap(),
            "--bench" => {}
            "--" => server_args.extend(args.by_ref().filter(|a| a != "--bench")),
            other => panic!("unknown option {other}"),
        }
    }
    let binary = std::env::var_os("STEREO_RECON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stereo-recon")));
    let mut full_args =
        vec!["--device".to_owned(), "cpu".to_owned(), "--max-upload-bytes".to_owned(), "100000000".into()];
    full_args.extend(server_args);
    let mut server = ServerProcess::start(&binary, &full_args, Path::new("."));
    let address = server.address;
    let pid = server.pid();
    std::thread::sleep(Duration::from_secs(1));
    let before = loadgen::rss_kib(pid).unwrap_or(0) / 1024;

    let running = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (running, peak) = (running.clone(), peak.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                if let Some(kib) = loadgen::rss_kib(pid) {
                    peak.fetch_max(kib / 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if v2_pixels > 0 {
        let body = Arc::new(v2_json_body(v2_pixels));
        let outcomes = runtime.block_on(v2_flood(address, clients, body.clone()));
        running.store(false, Ordering::Relaxed);
        sampler.join().unwrap();
        let exit = server.terminate(Duration::from_secs(60));
        let charged = (clients * body.len()) >> 20;
        println!(
            "{clients} clients x one {} MB JSON tensor body ({v2_pixels} pixels an input): server RSS {before} MiB before, {} MiB peak (+{} MiB; bodies declared {charged} MiB, charged to the budget twice that by servers that charge JSON tensor data twice); answers {outcomes:?}; exit {exit}",
            body.len() >> 20,
            peak.load(Ordering::Relaxed),
            peak.load(Ordering::Relaxed).saturating_sub(before),
        );
        return;
    }
    let outcomes: Vec<String> = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                tokio::spawn(async move {
                    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
                        return "connect failed".to_owned();
                    };
                    let length = mb << 20;
                    let head = format!(
                        "POST /api/v1/disparity HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"left\":\""
                    );
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return "closed".into();
                    }
                    let chunk = vec![b'A'; chunk_kb << 10];
                    let mut sent = head.len();
                    let mut answer = [0u8; 12];
                    while sent < length && Instant::now() < deadline {
                        // An early answer (503) is read as soon as it comes.
                        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut answer)).await {
                            return if n == 0 { "closed".into() } else { String::from_utf8_lossy(&answer[..n]).into_owned() };
                        }
                        let n = chunk.len().min(length - sent);
                        if stream.write_all(&chunk[..n]).await.is_err() {
                            return "reset".into();
                        }
                        sent += n;
                    }
                    "still sending at the end".into()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap_or_else(|e| e.to_string()));
        }
        outcomes
    });
    running.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in outcomes {
        *counts.entry(outcome.trim().to_owned()).or_default() += 1;
    }
    let exit = server.terminate(Duration::from_secs(60));
    println!(
        "{clients} clients x {mb} MB at {chunk_kb} KiB / 100 ms for {seconds} s: server RSS {before} MiB before, {} MiB peak; outcomes {counts:?}; exit {exit}",
        peak.load(Ordering::Relaxed)
    );
}

/// An inference request with two `pixels`-pixel UINT8 inputs as JSON numbers,
/// asking for an output the model has not (so it is refused after parsing).
fn v2_json_body(pixels: usize) -> Vec<u8> {
    let width = 1000usize;
    let height = pixels.div_ceil(width);
    let values: String = (0..width * height * 3).map(|i| ((i * 7919) % 256).to_string()).collect::<Vec<_>>().join(",");
    let input = |name: &str| {
        format!(r#"{{"name":"{name}","datatype":"UINT8","shape":[{height},{width},3],"data":[{values}]}}"#)
    };
    format!(r#"{{"inputs":[{},{}],"outputs":[{{"name":"not-an-output"}}]}}"#, input("left"), input("right"))
        .into_bytes()
}

/// `clients` connections each sending `body` at once; the status line each got.
async fn v2_flood(address: std::net::SocketAddr, clients: usize, body: Arc<Vec<u8>>) -> BTreeMap<String, usize> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
                    return "connect failed".to_owned();
                };
                let head = format!(
                    "POST /v2/models/psmnet-kitti2015/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
                    return "reset".into();
                }
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut answer)).await;
                String::from_utf8_lossy(&answer).lines().next().unwrap_or("no answer").to_owned()
            })
        })
        .collect();
    let mut counts = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.await.unwrap_or_else(|e| e.to_string())).or_default() += 1;
    }
    counts
}
