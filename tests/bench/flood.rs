//! Upload flood: `make flood` (docs/robustness.md). Starts the release server
//! on 127.0.0.1 and opens `--clients` connections that each announce a
//! `--mb` MB JSON body and send it slowly (`--chunk-kb` every 100 ms), as an
//! attacker holding memory would; samples the server's resident memory every
//! 100 ms and prints its peak, what each client was answered, and the memory
//! budget's verdicts. Bounded: `--seconds` at most, loopback only.
//!
//! `cargo bench --bench flood -- [--clients 60] [--mb 60] [--chunk-kb 256]
//!  [--seconds 20] [-- SERVER ARGS...]`

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
    let mut server_args: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => clients = value().parse().unwrap(),
            "--mb" => mb = value().parse().unwrap(),
            "--chunk-kb" => chunk_kb = value().parse().unwrap(),
            "--seconds" => seconds = value().parse().unwrap(),
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
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
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
