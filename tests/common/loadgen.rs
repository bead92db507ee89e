//! A small HTTP/1.1 load generator for the disparity API, bounded in clients,
//! time and request count, aimed only at a server on this machine (loopback),
//! and a helper that runs the real server binary as a child process.
//! Shared by the integration tests (through `common`) and the benches in
//! `tests/bench` (through `#[path]`).
#![allow(dead_code)] // each includer uses a different subset

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What to send, how hard and for how long.
#[derive(Clone)]
pub struct LoadConfig {
    pub address: SocketAddr,
    pub path: String,
    pub content_type: String,
    pub body: Arc<Vec<u8>>,
    pub clients: usize,
    pub duration: Duration,
    /// Stop after this many requests in all, whatever the time.
    pub max_requests: usize,
    /// A client whose request was refused with 503 waits this long before the
    /// next one (a polite client honours Retry-After; a load test should still press).
    pub backoff_after_503: Duration,
    /// A request not answered within this time counts as timed out.
    pub request_timeout: Duration,
}

/// One request's fate.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// HTTP status, or 0 when no response came (connection error or time-out).
    pub status: u16,
    pub latency: Duration,
    pub retry_after: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct LoadReport {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[rank.min(sorted.len() - 1)])
}

impl LoadReport {
    pub fn count(&self, status: u16) -> usize {
        self.outcomes.iter().filter(|o| o.status == status).count()
    }

    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut map = BTreeMap::new();
        for o in &self.outcomes {
            *map.entry(o.status).or_default() += 1;
        }
        map
    }

    /// Latencies of the requests that got `status`, sorted.
    pub fn latencies(&self, status: u16) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.outcomes.iter().filter(|o| o.status == status).map(|o| o.latency).collect();
        v.sort();
        v
    }

    pub fn percentile_ms(&self, status: u16, p: f64) -> Option<f64> {
        percentile(&self.latencies(status), p).map(|d| d.as_secs_f64() * 1000.0)
    }

    /// Successful answers per second over the run.
    pub fn throughput(&self) -> f64 {
        self.count(200) as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `config.clients` clients in parallel, each on its own keep-alive
/// connection, until the time or request budget is spent.
pub async fn run(config: LoadConfig) -> LoadReport {
    let started = Instant::now();
    let deadline = started + config.duration;
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(config.max_requests));
    let mut tasks = Vec::new();
    for _ in 0..config.clients {
        let config = config.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut connection: Option<BufReader<TcpStream>> = None;
            while Instant::now() < deadline {
                let left = budget.fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                );
                if left.is_err() {
                    break;
                }
                let begun = Instant::now();
                let result = tokio::time::timeout(config.request_timeout, exchange(&config, &mut connection)).await;
                let outcome = match result {
                    Ok(Ok((status, retry_after))) => {
                        Outcome { status, latency: begun.elapsed(), retry_after, error: None }
                    }
                    Ok(Err(e)) => {
                        connection = None;
                        Outcome { status: 0, latency: begun.elapsed(), retry_after: None, error: Some(e.to_string()) }
                    }
                    Err(_) => {
                        connection = None;
                        Outcome {
                            status: 0,
                            latency: begun.elapsed(),
                            retry_after: None,
                            error: Some("timed out".into()),
                        }
                    }
                };
                let refused = outcome.status == 503;
                outcomes.push(outcome);
                if refused {
                    tokio::time::sleep(config.backoff_after_503).await;
                }
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.expect("client task"));
    }
    LoadReport { outcomes, elapsed: started.elapsed() }
}

/// One request on a kept-alive connection, as HTTP clients do it: a reused
/// connection that turns out closed (no response byte at all) is retried once
/// on a fresh one, and `Connection: close` in a response ends the connection.
async fn exchange(
    config: &LoadConfig,
    connection: &mut Option<BufReader<TcpStream>>,
) -> std::io::Result<(u16, Option<String>)> {
    let reused = connection.is_some();
    match exchange_once(config, connection).await {
        Err(e) if reused && e.kind() == std::io::ErrorKind::UnexpectedEof => {
            *connection = None;
            exchange_once(config, connection).await
        }
        other => other,
    }
}

async fn exchange_once(
    config: &LoadConfig,
    connection: &mut Option<BufReader<TcpStream>>,
) -> std::io::Result<(u16, Option<String>)> {
    if connection.is_none() {
        *connection = Some(BufReader::new(TcpStream::connect(config.address).await?));
    }
    let stream = connection.as_mut().expect("connected above");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        config.path,
        config.address,
        config.content_type,
        config.body.len()
    );
    // The server may answer (and close) before reading the whole body; a write
    // error then is not the outcome, the response is.
    let sent = async {
        stream.get_mut().write_all(head.as_bytes()).await?;
        stream.get_mut().write_all(&config.body).await
    }
    .await;
    let response = read_response(stream).await;
    let (status, headers, _) = match (response, sent) {
        (Ok(response), _) => response,
        (Err(e), Err(write_error)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(write_error),
        (Err(e), _) => return Err(e),
    };
    if headers.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        *connection = None;
    }
    Ok((status, headers.get("retry-after").cloned()))
}

/// Reads one HTTP/1.1 response with a Content-Length body.
pub async fn read_response(
    stream: &mut BufReader<TcpStream>,
) -> std::io::Result<(u16, BTreeMap<String, String>, Vec<u8>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status line"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        stream.read_line(&mut line).await?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).ok_or_else(|| bad("no length"))?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    Ok((status, headers, body))
}

/// Minimal HTTP/1.1 exchange with `Connection: close`; returns (status, body).
pub fn http(address: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body =
        response.windows(4).position(|w| w == b"\r\n\r\n").map(|i| response[i + 4..].to_vec()).unwrap_or_default();
    (status, body)
}

/// Resident memory of a process in KiB, from /proc (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Threads of process `pid` now (`Threads:` in /proc/PID/status).
pub fn thread_count(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok())
}

/// A multipart/form-data body with the given file fields, in order.
pub fn multipart(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "stereo-recon-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, bytes) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n").as_bytes(),
        );
        body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `stereo-recon serve` as a child process on 127.0.0.1, on a port the OS
/// chooses (read back from its "listening on" log line).
pub struct ServerProcess {
    child: Child,
    pub address: SocketAddr,
    /// The server's log lines (stderr), as they come.
    pub log: Receiver<String>,
}

impl ServerProcess {
    /// Starts `binary serve --host 127.0.0.1 --port 0 ARGS...` in `dir`.
    pub fn start(binary: &Path, args: &[String], dir: &Path) -> ServerProcess {
        let mut command = Command::new(binary);
        command.args(["serve", "--host", "127.0.0.1", "--port", "0"]).args(args).current_dir(dir);
        command.env("RUST_LOG", "stereo_recon=info");
        ServerProcess::spawn(command)
    }

    /// Starts a prepared command (binary, `serve` arguments with `--port 0`,
    /// environment, directory) and waits for the address it listens on; the
    /// caller decides the environment (the bundle test clears it).
    pub fn spawn(mut command: Command) -> ServerProcess {
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child =
            command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
        let stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let address = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = log.recv_timeout(left).expect("the server logs the address it listens on");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().expect("address").parse().expect("socket address");
            }
        };
        ServerProcess { child, address, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (at most `limit`) for the process to exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "SIGTERM could not be sent");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait on the server") {
                return status;
            }
            assert!(started.elapsed() < limit, "server did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
