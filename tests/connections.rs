//! The connection level under hostile clients: header-read and idle timeouts,
//! the connection cap, shutdown that ends, a write timeout, lingering close
//! for early rejections, and upload memory admission. Every test runs the
//! real server in process on 127.0.0.1:0 and is bounded in time and count.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stereo_recon::pipeline::UploadBudget;
use stereo_recon::server::{ConnectionLimits, ConnectionStats};
use stereo_recon::AppState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Running {
    address: SocketAddr,
    stats: Arc<ConnectionStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Signals shutdown and returns how long `serve` took to return.
    async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.server).await.expect("serve returns").unwrap().unwrap();
        started.elapsed()
    }
}

fn limits(configure: impl FnOnce(&mut ConnectionLimits)) -> ConnectionLimits {
    let mut limits = ConnectionLimits::default();
    configure(&mut limits);
    limits
}

async fn start_with(state: AppState) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stats = state.connection_stats.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(stereo_recon::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    Running { address, stats, stop: Some(stop), server }
}

/// A server whose model is missing: every connection-level behaviour, no inference.
async fn start(connections: ConnectionLimits) -> Running {
    let mut state = state(failed_engine().await, DEFAULT_LIMITS);
    state.connections = connections;
    start_with(state).await
}

/// Waits until the server closes `stream` (EOF or reset); `None` if it stays open past `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// One request on a fresh connection; the status and the raw answer.
async fn request(address: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

const HEALTH: &[u8] = b"GET /api/v1/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn silent_and_slow_header_connections_are_closed_by_the_header_timeout() {
    let server = start(limits(|l| l.header_read_timeout = Duration::from_secs(1))).await;
    let opened = Instant::now();
    let mut silent = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(server.address).await.unwrap());
        slow.push(TcpStream::connect(server.address).await.unwrap());
    }
    // The slow ones send a header byte every 200 ms: never a whole head in time.
    let trickle = tokio::spawn(async move {
        let head = b"GET /api/v1/health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head.iter().take(15) {
            for stream in slow.iter_mut() {
                let _ = stream.write_all(&[*byte]).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slow
    });
    for stream in silent.iter_mut() {
        closed_within(stream, Duration::from_secs(5)).await.expect("a silent connection is closed");
        assert!(opened.elapsed() >= Duration::from_millis(700), "closed too early: {:?}", opened.elapsed());
    }
    let mut slow = trickle.await.unwrap();
    for stream in slow.iter_mut() {
        assert!(closed_within(stream, Duration::from_secs(3)).await.is_some(), "a slow header is cut");
    }
    assert!(server.stats.timed_out.load(Ordering::Relaxed) >= 150, "{:?}", server.stats);
    assert_eq!(request(server.address, HEALTH).await.0, 503, "health still answers (the model is absent here)");
    server.shutdown().await;
}

#[tokio::test]
async fn kept_alive_connections_are_closed_after_the_idle_timeout() {
    let server = start(limits(|l| {
        l.header_read_timeout = Duration::from_secs(10);
        l.idle_timeout = Duration::from_secs(1);
    }))
    .await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(b"GET /api/v1/examples HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut reader = tokio::io::BufReader::new(&mut stream);
    let (status, headers, _) = read_http_response(&mut reader).await;
    assert_eq!(status, 200);
    assert!(!headers.contains("connection: close"), "kept alive: {headers}");
    let idle = closed_within(&mut stream, Duration::from_secs(5)).await.expect("an idle connection is closed");
    assert!(idle >= Duration::from_millis(800) && idle < Duration::from_secs(3), "closed after {idle:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn at_the_connection_cap_idle_sockets_are_evicted_and_health_stays_reachable() {
    let server = start(limits(|l| {
        l.max_connections = 50;
        l.header_read_timeout = Duration::from_secs(60);
    }))
    .await;
    let mut attackers = Vec::new();
    for _ in 0..400 {
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Partial: ").await;
        attackers.push(stream);
    }
    // Give the accept loop time to take them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats.accepted.load(Ordering::Relaxed) < 400 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        let (status, answer) = request(server.address, HEALTH).await;
        assert_eq!(status, 503, "health answers while 400 half-open sockets press: {answer}");
        assert!(answer.contains("\"status\":\"failed\""), "{answer}");
    }
    let open = server.stats.open.load(Ordering::Relaxed);
    assert!(open <= 50, "{open} connections open over a cap of 50");
    assert!(server.stats.evicted.load(Ordering::Relaxed) >= 350, "{:?}", server.stats);
    drop(attackers);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_and_cuts_unread_answers_at_the_deadline() {
    let server = start(limits(|l| {
        l.shutdown_timeout = Duration::from_secs(1);
        l.write_timeout = Duration::from_secs(60);
        l.header_read_timeout = Duration::from_secs(60);
    }))
    .await;
    let mut idle = TcpStream::connect(server.address).await.unwrap();
    let mut half_open = TcpStream::connect(server.address).await.unwrap();
    half_open.write_all(b"GET /api/v1/health HTTP/1.1\r\nHo").await.unwrap();
    // A client that asks for 60 x 786 KB and reads none of it: the server's writes block.
    let mut greedy = TcpStream::connect(server.address).await.unwrap();
    let pipelined = b"GET /data/synthetic/disp_gt.pfm HTTP/1.1\r\nHost: t\r\n\r\n".repeat(60);
    greedy.write_all(&pipelined).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = server.shutdown().await;
    assert!(took < Duration::from_secs(4), "shutdown took {took:?} with a 1 s drain deadline");
    for stream in [&mut idle, &mut half_open] {
        assert!(closed_within(stream, Duration::from_secs(1)).await.is_some());
    }
    drop(greedy);
}

#[tokio::test]
async fn an_answer_nobody_reads_is_dropped_after_the_write_timeout() {
    let server = start(limits(|l| {
        l.write_timeout = Duration::from_secs(1);
        l.header_read_timeout = Duration::from_secs(60);
    }))
    .await;
    let mut greedy = TcpStream::connect(server.address).await.unwrap();
    let pipelined = b"GET /data/synthetic/disp_gt.pfm HTTP/1.1\r\nHost: t\r\n\r\n".repeat(60);
    greedy.write_all(&pipelined).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    while server.stats.timed_out.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the stalled write was never timed out: {:?}", server.stats);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.stats.open.load(Ordering::Relaxed), 0);
    server.shutdown().await;
}

/// Sends the whole request (head and body) before reading anything, as
/// urllib and HttpURLConnection do; returns the status and answer.
async fn send_all_then_read(address: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.expect("head sent");
    stream.write_all(body).await.expect("the whole body is accepted (lingering close), not reset");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await.expect("answer").unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[tokio::test]
async fn early_rejections_reach_clients_that_send_the_whole_body_first() {
    let state = state(failed_engine().await, DEFAULT_LIMITS);
    let budget = state.uploads.clone();
    let server = start_with(state).await;
    // 6 MB (and 20 MB, over the 16 MB limit): more than the socket buffers hold.
    let body = vec![b'x'; 20 << 20];
    let head = |path: &str, content_type: &str, length: usize| {
        format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n")
    };
    for (path, content_type, length, status, code) in [
        ("/api/v1/disparity", "text/plain", 6 << 20, 415, "unsupported_media_type"),
        ("/api/v1/disparity?format=gif", "application/json", 6 << 20, 400, "invalid_query"),
        ("/api/v1/disparity", "application/json", 20 << 20, 413, "body_too_large"),
    ] {
        let (got, answer) =
            send_all_then_read(server.address, &head(path, content_type, length), &body[..length]).await;
        assert_eq!(got, status, "{answer}");
        assert!(answer.contains(code), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    }
    // 503 from the memory budget: its Retry-After is read too.
    let held = budget.try_admit(u64::MAX).unwrap();
    let small = head("/api/v1/disparity", "application/json", 6 << 20);
    let (got, answer) = send_all_then_read(server.address, &small, &body[..6 << 20]).await;
    assert_eq!(got, 503, "{answer}");
    assert!(answer.contains("upload_budget_full") && answer.to_ascii_lowercase().contains("retry-after: 1"));
    drop(held);
    // Expect: 100-continue gets the refusal, not "100 Continue".
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let expect =
        head("/api/v1/disparity", "text/plain", 6 << 20).replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n");
    stream.write_all(expect.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 415");
    assert!(server.stats.lingered.load(Ordering::Relaxed) >= 4, "{:?}", server.stats);
    server.shutdown().await;
}

#[tokio::test]
async fn pythons_urllib_reads_the_early_error_of_a_large_upload() {
    let server = start(ConnectionLimits::default()).await;
    let script = format!(
        r#"
import json, urllib.request, urllib.error
body = b"--b\r\nContent-Disposition: form-data; name=\"wrong\"; filename=\"x\"\r\n\r\n" + b"x" * (8 << 20) + b"\r\n--b--\r\n"
request = urllib.request.Request("http://{}/api/v1/disparity", data=body, headers={{"Content-Type": "multipart/form-data; boundary=b"}})
try:
    urllib.request.urlopen(request, timeout=20)
except urllib.error.HTTPError as e:
    print(e.code, json.load(e)["error"]["code"])
"#,
        server.address
    );
    let output = tokio::process::Command::new("python3").args(["-c", &script]).output().await.expect("python3 runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed.trim(), "400 unexpected_field", "stderr: {}", String::from_utf8_lossy(&output.stderr));
    server.shutdown().await;
}

#[tokio::test]
async fn uploads_past_the_memory_budget_are_refused_before_their_body_is_read() {
    let mut state = state(failed_engine().await, DEFAULT_LIMITS);
    state.uploads = UploadBudget::new(10 << 20);
    let server = start_with(state).await;
    // Eight clients announce 4 MB each and send slowly: two fit in 10 MB.
    let mut slow = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        let head = "POST /api/v1/disparity HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n{\"left\":\"";
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        match tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut first)).await {
            Ok(Ok(_)) => {
                assert_eq!(&first, b"HTTP/1.1 503");
                refused += 1;
            }
            _ => slow.push(stream),
        }
    }
    assert_eq!((slow.len(), refused), (2, 6));
    let (_, health) = request(server.address, HEALTH).await;
    assert!(health.contains("\"failed\""), "{health}");
    drop(slow);
    server.shutdown().await;
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_get_501() {
    let server = start(ConnectionLimits::default()).await;
    let (status, answer) = request(
        server.address,
        b"POST /api/v1/disparity HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 501, "{answer}");
    assert!(answer.contains("unsupported_transfer_coding"), "{answer}");
    server.shutdown().await;
}

/// A chunk line declaring more than the body limit is answered 413 at once,
/// not after the upload timeout (the body never comes); chunked bodies within
/// the limit, several on one connection, are read as before.
#[tokio::test]
async fn an_absurd_chunk_size_is_refused_at_once() {
    let server = start_with(state(ready_engine(2).await, DEFAULT_LIMITS)).await;
    let head = "POST /api/v1/disparity HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    for body in ["ffffffffff\r\n", "5\r\n{\"a\":\r\n1000000\r\n"] {
        let started = Instant::now();
        let (status, answer) = request(server.address, format!("{head}{body}").as_bytes()).await;
        assert_eq!(status, 413, "{answer}");
        assert!(
            answer.contains("body_too_large") && answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }
    // Two chunked requests within the limit on one connection: each gets its own answer.
    let small = format!("{head}2\r\n{{}}\r\n0\r\n\r\n");
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(small.repeat(2).as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    for _ in 0..2 {
        let (status, _, body) = read_http_response(&mut reader).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("missing_field"));
    }
    server.shutdown().await;
}

/// Reads one response head and its Content-Length body.
async fn read_http_response<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> (u16, String, Vec<u8>) {
    use tokio::io::AsyncBufReadExt;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    (status, head, body)
}

#[tokio::test]
async fn an_answer_after_the_whole_body_was_read_keeps_the_connection() {
    let server = start(ConnectionLimits::default()).await;
    let (content_type, body) = multipart(&[("left", b"only one image")]);
    let head = format!(
        "POST /api/v1/disparity HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    for _ in 0..2 {
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let mut reader = tokio::io::BufReader::new(&mut stream);
        let (status, headers, answer) = read_http_response(&mut reader).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
        assert!(!headers.contains("connection: close"), "the body was read: keep the connection\n{headers}");
    }
    assert_eq!(server.stats.lingered.load(Ordering::Relaxed), 0);
    server.shutdown().await;
}

/// A client that half-closes its socket after sending a whole request (as `nc -N`
/// or a `shutdown(SHUT_WR)` does) still gets its answer, even one that takes the
/// model a while: end of input is not a cancelled request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let running = start_with(state(ready_engine(2).await, DEFAULT_LIMITS)).await;
    let (left, right) = small_pair();
    let (content_type, body) = {
        let request = multipart_request("/api/v1/disparity?format=pfm", &[("left", &left), ("right", &right)]);
        let content_type = request.headers()["content-type"].to_str().unwrap().to_owned();
        (content_type, axum::body::to_bytes(request.into_body(), usize::MAX).await.unwrap())
    };
    for round in 0..3 {
        let mut stream = TcpStream::connect(running.address).await.unwrap();
        let head = format!(
            "POST /api/v1/disparity?format=pfm HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        stream.shutdown().await.unwrap(); // our FIN: nothing more will be sent
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}: {text:?}");
    }
    running.shutdown().await;
}

/// A request line too long for the server is refused with a JSON error like any other.
#[tokio::test]
async fn an_overlong_request_line_is_refused_with_json() {
    let running = start(ConnectionLimits::default()).await;
    let raw = format!("GET /api/v1/health?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "q".repeat(100_000));
    let (status, text) = request(running.address, raw.as_bytes()).await;
    assert!(status == 414 || status == 431, "{status}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    assert!(json["error"]["code"].is_string(), "{json}");
    running.shutdown().await;
}
