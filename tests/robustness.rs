//! Robustness: hostile input, engine failures, cancelled and slow clients, and
//! a short burst of concurrent load; after each, the server is still healthy.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::loadgen::{self, LoadConfig};
use common::*;
use image::{ImageFormat, Rgb, RgbImage};
use serde_json::json;
use stereo_recon::engine::{Engine, EngineConfig, Fault, FaultInjector};
use stereo_recon::Limits;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn assert_healthy(app: &axum::Router) {
    let health = get(app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::OK, "server unhealthy: {}", String::from_utf8_lossy(&health.body));
}

/// A tiny PNG declaring `width` x `height` pixels: a valid header, a scrap of data.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for (kind, data) in [(&ihdr[..4], &ihdr[4..]), (b"IDAT", &[0x78, 0x9c, 0x63, 0x60][..]), (b"IEND", &[][..])] {
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    png
}

#[tokio::test]
async fn hostile_uploads_get_clear_errors_and_the_server_stays_healthy() {
    let engine = ready_engine(2).await;
    let limits = Limits { max_upload_bytes: 2 * 1024 * 1024, max_pixels: 1_000_000, ..DEFAULT_LIMITS };
    let app = stereo_recon::router(state(engine.clone(), limits));
    let uri = "/api/v1/disparity";
    let (left, right) = small_pair();
    let jpeg = encode(&image::load_from_memory(&left).unwrap(), ImageFormat::Jpeg);
    let bomb = png_bomb(60_000, 60_000);
    assert!(bomb.len() < 100, "the bomb is {} bytes", bomb.len());
    let wide = png(&RgbImage::from_pixel(20_000, 1, Rgb([128, 64, 32])));

    let multipart_case = |fields: Vec<(&'static str, Vec<u8>)>| {
        let refs: Vec<(&str, &[u8])> = fields.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        multipart_request(uri, &refs)
    };
    let json_case =
        |body: String| Request::post(uri).header("content-type", "application/json").body(Body::from(body)).unwrap();
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "empty parts",
            multipart_case(vec![("left", vec![]), ("right", vec![])]),
            StatusCode::BAD_REQUEST,
            "empty_image",
        ),
        ("missing part", multipart_case(vec![("left", left.clone())]), StatusCode::BAD_REQUEST, "missing_field"),
        (
            "duplicate parts",
            multipart_case(vec![("left", left.clone()), ("right", right.clone()), ("right", right.clone())]),
            StatusCode::BAD_REQUEST,
            "duplicate_field",
        ),
        (
            "wrong field names",
            multipart_case(vec![("img_l", left.clone()), ("img_r", right.clone())]),
            StatusCode::BAD_REQUEST,
            "unexpected_field",
        ),
        (
            "non-image bytes",
            multipart_case(vec![("left", b"#!/bin/sh\nrm -rf /\n".to_vec()), ("right", right.clone())]),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "truncated PNG",
            multipart_case(vec![("left", left[..left.len() - 40].to_vec()), ("right", right.clone())]),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "truncated JPEG",
            multipart_case(vec![("left", jpeg[..jpeg.len() / 2].to_vec()), ("right", jpeg.clone())]),
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            "image bomb",
            multipart_case(vec![("left", bomb.clone()), ("right", bomb.clone())]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_pixels",
        ),
        (
            "extreme aspect ratio (20000 x 1 pads to 20000 x 256)",
            multipart_case(vec![("left", wide.clone()), ("right", wide.clone())]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_pixels",
        ),
        (
            "mismatched sizes",
            multipart_case(vec![("left", left.clone()), ("right", png(&RgbImage::new(48, 64)))]),
            StatusCode::BAD_REQUEST,
            "size_mismatch",
        ),
        (
            "oversized body",
            multipart_case(vec![("left", vec![0; 3 * 1024 * 1024]), ("right", right.clone())]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "malformed multipart",
            Request::post(uri)
                .header("content-type", "multipart/form-data; boundary=xyz")
                .body(Body::from("--xyz\r\ngarbage without headers"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_multipart",
        ),
        (
            "multipart without boundary",
            Request::post(uri).header("content-type", "multipart/form-data").body(Body::from("x")).unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_multipart",
        ),
        (
            "invalid base64",
            json_case(json!({ "left": "@@@@", "right": b64(&right) }).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_base64",
        ),
        (
            "deeply nested JSON",
            json_case(format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000))),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "huge JSON",
            json_case(json!({ "left": "A".repeat(3 * 1024 * 1024), "right": "" }).to_string()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        ("JSON of the wrong shape", json_case("[1, 2, 3]".into()), StatusCode::BAD_REQUEST, "invalid_json"),
    ];
    for (name, request, status, code) in cases {
        let started = Instant::now();
        let reply = send(&app, request).await;
        assert_eq!(reply.status, status, "{name}: {}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.error_code(), code, "{name}");
        println!("{name}: {} {code} in {:.1} ms", status.as_u16(), started.elapsed().as_secs_f64() * 1000.0);
        assert_healthy(&app).await;
    }
    // Nothing hostile reached the engine.
    assert_eq!(engine.stats().completed + engine.stats().failed, 0);

    // Legal but odd inputs are served: 1 x 1 and a long thin strip.
    for (w, h) in [(1, 1), (600, 1), (1, 300)] {
        let image = png(&RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 90])));
        let reply =
            send(&app, multipart_request("/api/v1/disparity?format=pfm", &[("left", &image), ("right", &image)])).await;
        assert_eq!(reply.status, StatusCode::OK, "{w}x{h}: {}", String::from_utf8_lossy(&reply.body));
        let map = stereo_recon::codec::pfm::decode(&reply.body).unwrap();
        assert_eq!((map.width(), map.height()), (w, h));
        assert!(map.values().iter().all(|d| d.is_finite()));
    }
    // And an ordinary pair still works at the end.
    let reply = send(&app, multipart_request(uri, &[("left", &left), ("right", &right)])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_healthy(&app).await;
}

fn faulty_engine_config(faults: Arc<FaultInjector>, queue_depth: usize) -> EngineConfig {
    EngineConfig { faults: Some(faults), ..engine_config(model_path(), queue_depth) }
}

#[tokio::test]
async fn an_engine_failure_affects_only_its_own_request() {
    let faults = Arc::new(FaultInjector::default());
    let engine = Engine::start(faulty_engine_config(faults.clone(), 2)).unwrap();
    engine.wait_ready().await.unwrap();
    let app = app(engine.clone());
    let (left, right) = small_pair();
    let fields: [(&str, &[u8]); 2] = [("left", &left), ("right", &right)];

    for (fault, status, code) in [
        (Fault::TorchError, StatusCode::INTERNAL_SERVER_ERROR, "inference_failed"),
        (Fault::OutOfMemory, StatusCode::SERVICE_UNAVAILABLE, "out_of_memory"),
        (Fault::Panic, StatusCode::INTERNAL_SERVER_ERROR, "inference_failed"),
    ] {
        faults.arm(fault);
        let reply = send(&app, multipart_request("/api/v1/disparity", &fields)).await;
        assert_eq!(reply.status, status, "{fault:?}");
        assert_eq!(reply.error_code(), code, "{fault:?}");
        let message = reply.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(!message.contains("injected") && !message.contains("Tried to allocate"), "leaked: {message}");
        if fault == Fault::OutOfMemory {
            assert!(!reply.header("retry-after").is_empty());
        }
        // The very next request is served normally.
        let reply = send(&app, multipart_request("/api/v1/disparity?format=pfm", &fields)).await;
        assert_eq!(reply.status, StatusCode::OK, "after {fault:?}");
        assert_healthy(&app).await;
    }
    let stats = engine.stats();
    assert_eq!((stats.failed, stats.completed, stats.in_flight), (3, 3, 0));
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cancelled_requests_free_their_place_at_once() {
    // Capacity 2: one running, one waiting.
    let engine = ready_engine(1).await;
    let app = app(engine.clone());
    let (left, right) = fixture_pair();
    let request = move || {
        let app = app.clone();
        let (l, r) = (left.clone(), right.clone());
        tokio::spawn(async move {
            send(&app, multipart_request("/api/v1/disparity?format=pfm", &[("left", &l), ("right", &r)])).await
        })
    };

    let running = request();
    wait_until("the first request is admitted", || engine.stats().in_flight == 1).await;
    let queued = request();
    wait_until("the second request is queued", || engine.stats().in_flight == 2).await;
    let refused = request().await.unwrap();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "the queue is full");

    // The client of the queued request goes away: its place frees immediately,
    // long before the running inference (seconds on CPU) finishes.
    queued.abort();
    wait_until("the abandoned place is free", || engine.stats().in_flight == 1).await;
    let replacement = request();
    wait_until("the replacement is admitted", || engine.stats().in_flight == 2).await;

    // Cancel the running request mid-inference too: its place frees as well.
    running.abort();
    wait_until("the running request's place is free", || engine.stats().in_flight == 1).await;
    assert!(!replacement.is_finished());

    let reply = replacement.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    // The queued job was skipped, not computed; the running one finished unobserved.
    wait_until("the engine is idle", || engine.stats().in_flight == 0).await;
    let stats = engine.stats();
    assert_eq!(stats.abandoned, 1, "{stats:?}");
    assert_eq!(stats.completed, 2, "{stats:?}");
}

/// The app on a real socket (127.0.0.1, port chosen by the OS).
async fn serve_on_loopback(engine: Engine, limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stereo_recon::serve(listener, state(engine, limits), async move {
        let _ = stopped.await;
    }));
    (address, stop)
}

#[tokio::test]
async fn slow_and_vanishing_uploads_are_cut_off() {
    let engine = failed_engine().await; // the upload never gets as far as the engine
    let limits = Limits { upload_timeout: Duration::from_millis(800), ..DEFAULT_LIMITS };
    let (address, _stop) = serve_on_loopback(engine, limits).await;
    let (left, right) = small_pair();
    let (content_type, body) = multipart(&[("left", &left), ("right", &right)]);
    let head = format!(
        "POST /api/v1/disparity HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );

    // A client that sends part of its body and then stalls gets 408, not a hung request.
    let mut slow = BufReader::new(TcpStream::connect(address).await.unwrap());
    slow.get_mut().write_all(head.as_bytes()).await.unwrap();
    slow.get_mut().write_all(&body[..body.len() / 3]).await.unwrap();
    let (status, _, reply) =
        tokio::time::timeout(Duration::from_secs(20), loadgen::read_response(&mut slow)).await.unwrap().unwrap();
    assert_eq!(status, 408);
    let json: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(json["error"]["code"], "upload_timeout");

    // A client that disconnects mid-upload leaves nothing behind: the next
    // connection is served as usual.
    {
        let mut gone = TcpStream::connect(address).await.unwrap();
        gone.write_all(head.as_bytes()).await.unwrap();
        gone.write_all(&body[..body.len() / 2]).await.unwrap();
    }
    let mut next = BufReader::new(TcpStream::connect(address).await.unwrap());
    next.get_mut().write_all(b"GET /api/v1/examples HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (status, _, _) = loadgen::read_response(&mut next).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn under_concurrent_load_excess_requests_are_refused_fast_and_none_fail() {
    // 8 clients against one running + 2 waiting places, for a few seconds.
    let engine = ready_engine(2).await;
    let (address, _stop) = serve_on_loopback(engine.clone(), DEFAULT_LIMITS).await;
    let (left, right) = small_pair();
    let (content_type, body) = multipart(&[("left", &left), ("right", &right)]);
    let report = loadgen::run(LoadConfig {
        address,
        path: "/api/v1/disparity?format=png16".into(),
        content_type,
        body: Arc::new(body),
        clients: 8,
        duration: Duration::from_secs(8),
        max_requests: 2_000,
        backoff_after_503: Duration::from_millis(100),
        request_timeout: Duration::from_secs(60),
    })
    .await;
    println!("statuses {:?}, {:.2} ok/s", report.statuses(), report.throughput());
    let statuses = report.statuses();
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "unexpected outcomes: {statuses:?} {:?}",
        report.outcomes.iter().find(|o| o.status != 200 && o.status != 503)
    );
    assert!(report.count(200) >= 2, "{statuses:?}");
    assert!(report.count(503) >= 1, "8 clients on 3 places must see refusals: {statuses:?}");
    assert!(report.outcomes.iter().filter(|o| o.status == 503).all(|o| o.retry_after.is_some()));
    // Refusals come back without waiting for an inference.
    let refused_p99 = report.percentile_ms(503, 99.0).unwrap();
    let served_p50 = report.percentile_ms(200, 50.0).unwrap();
    assert!(refused_p99 < served_p50, "503 p99 {refused_p99:.1} ms vs 200 p50 {served_p50:.1} ms");
    wait_until("the engine drains", || engine.stats().in_flight == 0).await;
    assert_eq!(engine.stats().failed, 0);
}
