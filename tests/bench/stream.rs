//! `make bench-stream` (docs/stream.md): frames/s and per-frame latency of the
//! WebSocket stream, with the release binary serving on a loopback port.
//!
//! For each size and stream count, every stream sends side-by-side frames of
//! the synthetic scene at the video's rate (`--fps`) for `--seconds`, the way a
//! player would, and reads the answers. Prints, per configuration: answered
//! frames/s (all streams together), the latency from a frame's send to its
//! answer (p50, p95), and the share of frames skipped (latest frame wins).
//!
//! `cargo bench --bench stream -- [--binary target/release/stereo-recon]
//!  [--model models/psmnet_kitti2015.pt] [--device cpu] [--sizes 512x384,1242x375]
//!  [--streams 1,4] [--scales 1,0.5] [--fps 10] [--seconds 30] [--json FILE]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Options {
    binary: PathBuf,
    model: PathBuf,
    device: String,
    sizes: Vec<(u32, u32)>,
    streams: Vec<usize>,
    scales: Vec<f32>,
    fps: f64,
    seconds: f64,
    json: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        binary: PathBuf::from("target/release/stereo-recon"),
        model: PathBuf::from("models/psmnet_kitti2015.pt"),
        device: "cpu".into(),
        sizes: vec![(512, 384), (1242, 375)],
        streams: vec![1, 4],
        scales: vec![1.0, 0.5],
        fps: 10.0,
        seconds: 30.0,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--binary" => o.binary = value().into(),
            "--model" => o.model = value().into(),
            "--device" => o.device = value(),
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|s| {
                        let (w, h) = s.split_once('x').expect("--sizes WxH,...");
                        (w.parse().unwrap(), h.parse().unwrap())
                    })
                    .collect()
            }
            "--streams" => o.streams = value().split(',').map(|s| s.parse().unwrap()).collect(),
            "--scales" => o.scales = value().split(',').map(|s| s.parse().unwrap()).collect(),
            "--fps" => o.fps = value().parse().unwrap(),
            "--seconds" => o.seconds = value().parse().unwrap(),
            "--json" => o.json = Some(value().into()),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// The release server on a free port, stopped on drop.
struct Server {
    child: Child,
    address: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(o: &Options, streams: usize) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&o.binary)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--device", &o.device])
        .arg("--model")
        .arg(&o.model)
        .args(["--max-streams", &streams.to_string(), "--max-upload-bytes", &(64u64 << 20).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (run `make release` first)", o.binary.display()));
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = std::net::TcpStream::connect(address).ok().and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            Some(answer.starts_with("HTTP/1.1 200"))
        });
        if ready == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    Server { child, address }
}

/// Side-by-side PNG frames of the scene seen by a rig moving forward.
fn frames(width: u32, height: u32, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|k| {
            let scene = stereo_recon::synthetic::render_from(width, height, [0.0, 0.0, 0.05 * k as f64]);
            let mut frame = image::RgbImage::new(2 * width, height);
            image::imageops::replace(&mut frame, &scene.left, 0, 0);
            image::imageops::replace(&mut frame, &scene.right, i64::from(width), 0);
            let mut png = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(frame).write_to(&mut png, image::ImageFormat::Png).unwrap();
            png.into_inner()
        })
        .collect()
}

/// What one stream saw.
#[derive(Default)]
struct Seen {
    sent: u64,
    answered: u64,
    dropped: u64,
    latencies_ms: Vec<f64>,
}

/// One stream: frames at `fps` for `seconds`, answers read as they come, then
/// the frames in flight are waited for.
async fn one_stream(address: SocketAddr, frames: &[Vec<u8>], scale: f32, fps: f64, seconds: f64) -> Seen {
    let request = format!("ws://{address}/api/v1/stream").into_client_request().unwrap();
    let socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let (client, _) = tokio_tungstenite::client_async(request, socket).await.expect("stream opens");
    let (mut sink, mut source) = client.split();
    let settings = serde_json::json!({ "format": "color", "layout": "sbs", "scale": scale });
    sink.send(Message::text(settings.to_string())).await.unwrap();
    let started = Instant::now();
    let sent_at = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sender = {
        let sent_at = sent_at.clone();
        let frames = frames.to_vec();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / fps));
            let mut k = 0usize;
            while started.elapsed().as_secs_f64() < seconds {
                tick.tick().await;
                sent_at.lock().unwrap().push(Instant::now());
                sink.send(Message::binary(frames[k % frames.len()].clone())).await.unwrap();
                k += 1;
            }
            (sink, k as u64)
        }
    };
    let receiver = async {
        let mut seen = Seen::default();
        let mut info: Option<serde_json::Value> = None;
        loop {
            let wait = if started.elapsed().as_secs_f64() < seconds { 600.0 } else { 120.0 };
            let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs_f64(wait), source.next()).await else {
                break;
            };
            match message {
                Message::Text(text) => info = Some(serde_json::from_str(text.as_str()).unwrap()),
                Message::Binary(_) => {
                    let info = info.take().expect("text before image");
                    let frame = info["frame"].as_u64().unwrap() as usize;
                    let sent = sent_at.lock().unwrap()[frame];
                    seen.latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                    seen.answered += 1;
                    seen.dropped += info["dropped"].as_u64().unwrap();
                    let total = sent_at.lock().unwrap().len() as u64;
                    if started.elapsed().as_secs_f64() >= seconds && seen.answered + seen.dropped >= total {
                        break;
                    }
                }
                _ => {}
            }
        }
        seen
    };
    let ((mut sink, sent), mut seen) = tokio::join!(sender, receiver);
    seen.sent = sent;
    let _ = sink.close().await;
    seen
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = options();
    let mut rows = Vec::new();
    println!("stream bench: {} device, frames sent at {} fps for {} s per stream", o.device, o.fps, o.seconds);
    println!("| size | scale | streams | answered frames/s (all) | latency p50 ms | p95 ms | frames skipped |");
    println!("|---|---|---|---|---|---|---|");
    for &(width, height) in &o.sizes {
        let frames = frames(width, height, 8);
        for (&scale, &streams) in o.scales.iter().flat_map(|s| o.streams.iter().map(move |n| (s, n))) {
            let server = start_server(&o, streams);
            let started = Instant::now();
            let runs = (0..streams).map(|_| one_stream(server.address, &frames, scale, o.fps, o.seconds));
            let seen = futures_util::future::join_all(runs).await;
            let elapsed = started.elapsed().as_secs_f64();
            let answered: u64 = seen.iter().map(|s| s.answered).sum();
            let sent: u64 = seen.iter().map(|s| s.sent).sum();
            let dropped: u64 = seen.iter().map(|s| s.dropped).sum();
            let mut latencies: Vec<f64> = seen.iter().flat_map(|s| s.latencies_ms.iter().copied()).collect();
            let (p50, p95) = (percentile(&mut latencies, 0.5), percentile(&mut latencies, 0.95));
            let rate = answered as f64 / elapsed;
            println!(
                "| {width}x{height} | {scale} | {streams} | {rate:.2} | {p50:.0} | {p95:.0} | {dropped} of {sent} ({:.0} %) |",
                100.0 * dropped as f64 / sent.max(1) as f64
            );
            rows.push(serde_json::json!({
                "width": width, "height": height, "scale": scale, "streams": streams, "answered_per_s": rate,
                "latency_p50_ms": p50, "latency_p95_ms": p95, "sent": sent, "answered": answered, "dropped": dropped,
            }));
        }
    }
    if let Some(path) = &o.json {
        let document = serde_json::json!({ "device": o.device, "fps": o.fps, "seconds": o.seconds, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&document).unwrap()).unwrap();
    }
}
