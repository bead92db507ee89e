//! `GET /api/v1/stream`: the WebSocket protocol against a real server on a
//! loopback socket: answers equal to the HTTP API's, latest frame wins, close
//! codes for bad messages, the stream cap and the handshake's checks.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use image::{DynamicImage, RgbImage};
use stereo_recon::api::stream::Streams;
use stereo_recon::{AppState, Limits};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Client = WebSocketStream<TcpStream>;

struct Running {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

async fn start(state: AppState) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stereo_recon::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    Running { address, stop: Some(stop) }
}

/// Opens a stream with extra handshake headers; the server's refusal as (status, body) otherwise.
async fn open(address: SocketAddr, headers: &[(&str, &str)]) -> Result<Client, (u16, String)> {
    let mut request = format!("ws://{address}/api/v1/stream").into_client_request().unwrap();
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, HeaderValue::from_str(value).unwrap());
    }
    let socket = TcpStream::connect(address).await.unwrap();
    match tokio_tungstenite::client_async(request, socket).await {
        Ok((client, _)) => Ok(client),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The next answer: its JSON text and its image.
async fn answer(client: &mut Client) -> (serde_json::Value, Vec<u8>) {
    let text = next(client).await;
    let Message::Text(text) = text else { panic!("expected the answer's text, got {text:?}") };
    let image = next(client).await;
    let Message::Binary(image) = image else { panic!("expected the answer's image, got {image:?}") };
    (serde_json::from_str(text.as_str()).unwrap(), image.to_vec())
}

async fn next(client: &mut Client) -> Message {
    tokio::time::timeout(Duration::from_secs(120), client.next()).await.expect("an answer in time").unwrap().unwrap()
}

/// The close code the server ends the stream with.
async fn close_code(client: &mut Client) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), client.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn send_pair(client: &mut Client, left: &[u8], right: &[u8]) {
    client.send(Message::binary(left.to_vec())).await.unwrap();
    client.send(Message::binary(right.to_vec())).await.unwrap();
}

fn side_by_side(left: &RgbImage, right: &RgbImage) -> Vec<u8> {
    let mut frame = RgbImage::new(left.width() * 2, left.height());
    image::imageops::replace(&mut frame, left, 0, 0);
    image::imageops::replace(&mut frame, right, i64::from(left.width()), 0);
    encode(&DynamicImage::ImageRgb8(frame), image::ImageFormat::Png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_answered_as_the_api_answers_their_pairs() {
    let state = state(ready_engine(2).await, DEFAULT_LIMITS);
    let app = stereo_recon::router(state.clone());
    let server = start(state).await;
    let mut client = open(server.address, &[]).await.unwrap();
    let (left, right) = shifted_pair(96, 64, 5);
    let (left_png, right_png) = (png(&left), png(&right));

    client.send(Message::text(r#"{"format": "png16"}"#)).await.unwrap();
    send_pair(&mut client, &left_png, &right_png).await;
    let (text, image) = answer(&mut client).await;
    assert_eq!(
        (text["frame"].as_u64(), text["width"].as_u64(), text["height"].as_u64()),
        (Some(0), Some(96), Some(64))
    );
    assert_eq!(text["format"], "png16");
    assert_eq!(text["dropped"], 0);
    assert!((text["disparity"]["mean"].as_f64().unwrap() - 5.0).abs() < 1.0, "{text}");
    assert!(text["timings_ms"]["inference_ms"].as_f64().unwrap() > 0.0, "{text}");
    let api =
        send(&app, multipart_request("/api/v1/disparity?format=png16", &[("left", &left_png), ("right", &right_png)]))
            .await;
    assert_eq!(api.status, 200);
    assert_eq!(image, api.body.to_vec(), "the stream's PNG is the API's, byte for byte");

    // The same pair packed side by side, with the deviation: frame numbers go on.
    client.send(Message::text(r#"{"layout": "sbs", "format": "pfm", "max_uncertainty": 3}"#)).await.unwrap();
    client.send(Message::binary(side_by_side(&left, &right))).await.unwrap();
    let (text, image) = answer(&mut client).await;
    assert_eq!(text["frame"], 1);
    assert!(text["uncertainty"]["masked_pixels"].is_u64(), "{text}");
    let api = send(
        &app,
        multipart_request(
            "/api/v1/disparity?format=pfm&max_uncertainty=3",
            &[("left", &left_png), ("right", &right_png)],
        ),
    )
    .await;
    assert_eq!(image, api.body.to_vec(), "a packed frame gives the same PFM as its two views");

    // At half scale the answer is half the size, and says so.
    client.send(Message::text(r#"{"scale": 0.5, "format": "png16", "max_uncertainty": null}"#)).await.unwrap();
    client.send(Message::binary(side_by_side(&left, &right))).await.unwrap();
    let (text, image) = answer(&mut client).await;
    assert_eq!(
        (text["width"].as_u64(), text["height"].as_u64(), text["scale"].as_f64()),
        (Some(48), Some(32), Some(0.5))
    );
    let api = send(
        &app,
        multipart_request("/api/v1/disparity?format=png16&scale=0.5", &[("left", &left_png), ("right", &right_png)]),
    )
    .await;
    assert_eq!(image, api.body.to_vec(), "scaled like the API scales");
    client.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_frame_wins_and_the_rest_are_counted_as_dropped() {
    let state = state(ready_engine(2).await, DEFAULT_LIMITS);
    let server = start(state.clone()).await;
    let mut client = open(server.address, &[("sec-websocket-protocol", "stereo-recon")]).await.unwrap();
    const FRAMES: u64 = 12;
    for k in 0..FRAMES {
        let (left, right) = shifted_pair(96, 64, 2 + k as u32 % 4);
        send_pair(&mut client, &png(&left), &png(&right)).await;
    }
    let (mut answered, mut dropped, mut last) = (0, 0, None);
    while answered + dropped < FRAMES {
        let (text, _) = answer(&mut client).await;
        let frame = text["frame"].as_u64().unwrap();
        assert!(last.is_none_or(|l| frame > l), "answers come in frame order: {text}");
        last = Some(frame);
        answered += 1;
        dropped += text["dropped"].as_u64().unwrap();
    }
    assert_eq!(answered + dropped, FRAMES);
    assert!(dropped > 0, "frames sent faster than they run are skipped, not queued");
    assert_eq!(last, Some(FRAMES - 1), "the newest frame is always answered");
    let (count_answered, count_dropped) = state.streams.frame_counts();
    assert_eq!((count_answered, count_dropped), (answered, dropped));
    client.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_close_the_stream_with_their_code() {
    let limits = Limits { max_upload_bytes: 64 * 1024, max_pixels: 5000, ..DEFAULT_LIMITS };
    let server = start(state(ready_engine(2).await, limits)).await;
    let (left, _) = shifted_pair(64, 48, 0);
    let big = shifted_pair(96, 64, 0).0;
    let cases: Vec<(&str, Message, u16)> = vec![
        ("bad JSON", Message::text("{format: png16"), 1007),
        ("an unknown setting", Message::text(r#"{"speed": 2}"#), 1007),
        ("not an image", Message::binary(b"GIF89a not really".to_vec()), 1003),
        ("over the pixel limit", Message::binary(png(&big)), 1008),
        ("over the message limit", Message::binary(vec![0u8; 100 * 1024]), 1009),
        ("a depth format without a calibration", Message::text(r#"{"format": "depth"}"#), 1008),
    ];
    for (what, message, code) in cases {
        let mut client = open(server.address, &[]).await.unwrap();
        let _ = client.send(message).await;
        let (got, reason) = close_code(&mut client).await;
        assert_eq!(got, code, "{what}: {reason}");
        assert!(!reason.is_empty(), "{what}: the close says why");
    }
    // A good frame still works after all that.
    let mut client = open(server.address, &[]).await.unwrap();
    send_pair(&mut client, &png(&left), &png(&left)).await;
    let (text, _) = answer(&mut client).await;
    assert_eq!(text["frame"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_cap_origin_and_handshake_are_checked_before_the_upgrade() {
    let mut state = state(ready_engine(2).await, DEFAULT_LIMITS);
    state.streams = Streams::new(1, Duration::from_secs(1));
    let server = start(state.clone()).await;
    let first = open(server.address, &[]).await.unwrap();
    let (status, body) = open(server.address, &[]).await.expect_err("a second stream is refused");
    assert_eq!(status, 503);
    assert!(body.contains("too_many_streams"), "{body}");
    drop(first);
    // The slot comes back once the first stream is gone.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(client) = open(server.address, &[]).await {
            again = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = again.expect("the slot is given back");
    // An idle stream is closed with 1001 after --stream-idle-timeout-secs.
    assert_eq!(close_code(&mut again).await.0, 1001);

    let host = server.address.to_string();
    let (status, body) =
        open(server.address, &[("origin", "http://evil.example")]).await.expect_err("another origin is refused");
    assert_eq!(status, 403, "{body}");
    assert!(open(server.address, &[("origin", &format!("http://{host}"))]).await.is_ok(), "the page's own origin");

    let app = stereo_recon::router(state);
    let plain = get(&app, "/api/v1/stream").await;
    assert_eq!(plain.status, 400);
    assert_eq!(plain.json()["error"]["code"], "not_a_websocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutting_down_closes_its_streams_with_1001() {
    let mut server = start(state(ready_engine(2).await, DEFAULT_LIMITS)).await;
    let mut client = open(server.address, &[]).await.unwrap();
    let _ = server.stop.take().unwrap().send(());
    let (code, reason) = close_code(&mut client).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("shutting down"), "{reason}");
}

/// The resident memory of this process (the server runs in it), MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

async fn python_client(address: SocketAddr, folder: &std::path::Path, mode: &str) -> serde_json::Value {
    let output = tokio::process::Command::new(venv_python())
        .arg(repo().join("tests/clients/stream_client.py"))
        .arg(address.to_string())
        .arg(folder)
        .arg(mode)
        .output()
        .await
        .expect("python runs");
    assert!(output.status.success(), "the client failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_streams_a_rendered_video_and_gets_its_exact_disparity_back() {
    // Four frames of the rendered room seen by a rig moving forward: side-by-side
    // frames, their views, and each frame's exact disparity.
    let folder = std::env::temp_dir().join(format!("stereo-recon-stream-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    for k in 0..4u32 {
        let scene = stereo_recon::synthetic::render_from(256, 192, [0.05 * f64::from(k), 0.0, 0.1 * f64::from(k)]);
        std::fs::write(folder.join(format!("frame_{k}.png")), side_by_side(&scene.left, &scene.right)).unwrap();
        std::fs::write(folder.join(format!("left_{k}.png")), png(&scene.left)).unwrap();
        std::fs::write(folder.join(format!("right_{k}.png")), png(&scene.right)).unwrap();
        std::fs::write(folder.join(format!("truth_{k}.pfm")), stereo_recon::codec::pfm::encode(&scene.disparity))
            .unwrap();
    }
    let server = start(state(ready_engine(2).await, DEFAULT_LIMITS)).await;

    let seen = python_client(server.address, &folder, "frames").await;
    assert_eq!(seen["subprotocol"], "stereo-recon");
    let frames = seen["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 4);
    for (k, frame) in frames.iter().enumerate() {
        assert_eq!(frame["frame"], k as u64, "{frame}");
        assert_eq!(frame["dropped"], 0, "answers awaited one by one skip nothing: {frame}");
        assert_eq!(frame["shape"], serde_json::json!([192, 256]));
        assert_eq!(frame["max_diff_to_api"], 0.0, "the stream answers what the API answers: {frame}");
        assert!(frame["epe"].as_f64().unwrap() < 1.5, "close to the exact disparity: {frame}");
    }

    // Thirty frames at once: the newest ones are answered, the rest counted, memory flat.
    let before = rss_mib();
    let flood = python_client(server.address, &folder, "flood").await;
    let after = rss_mib();
    let (answered, dropped) = (flood["answered"].as_u64().unwrap(), flood["dropped"].as_u64().unwrap());
    assert_eq!(answered + dropped, 30, "{flood}");
    assert!(dropped >= 20, "frames sent at once are mostly skipped, not queued: {flood}");
    assert_eq!(flood["frames"].as_array().unwrap().last().unwrap(), 29, "{flood}");
    assert!(after < before + 150, "RSS {before} -> {after} MiB over 30 frames");
    std::fs::remove_dir_all(&folder).ok();
}
