//! Helpers shared by the integration tests: the real model, app state, request
//! builders and image fixtures.
#![allow(dead_code)] // each test binary uses a different subset

pub mod loadgen;

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbImage};
use stereo_recon::engine::{DeviceChoice, Engine, EngineConfig, MemoryFormat, Precision};
use stereo_recon::{AppState, Limits};
use tower::ServiceExt;

/// A program of the set-up's venv, where `make test` installs the Python clients
/// (`make test` exports VIRTUAL_ENV).
pub fn venv_tool(tool: &str) -> String {
    let venv =
        std::env::var("VIRTUAL_ENV").expect("run under `make test`, which sets VIRTUAL_ENV to the set-up's venv");
    format!("{venv}/bin/{tool}")
}

/// The venv's Python when there is one, else `python3` from PATH.
pub fn venv_python() -> String {
    std::env::var("VIRTUAL_ENV").map(|venv| format!("{venv}/bin/python")).unwrap_or_else(|_| "python3".into())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The exported model produced by the set-up (`make model`).
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("STEREO_RECON_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/psmnet_kitti2015.pt"));
    assert!(path.is_file(), "{} is missing: run `make test` (it exports the model first)", path.display());
    path
}

pub fn engine_config(model_path: PathBuf, queue_depth: usize) -> EngineConfig {
    EngineConfig {
        model_path,
        device: DeviceChoice::Cpu,
        queue_depth,
        threads: 0,
        memory_format: MemoryFormat::Auto,
        precision: Precision::Auto,
        warm_sizes: Vec::new(),
        cuda_graphs: 0,
        pinned_staging: true,
        cpu_buffer_pool: true,
        faults: None,
    }
}

/// An engine with the real model, loaded and warmed up.
pub async fn ready_engine(queue_depth: usize) -> Engine {
    let engine = Engine::start(engine_config(model_path(), queue_depth)).expect("engine thread starts");
    engine.wait_ready().await.expect("model loads");
    engine
}

/// An engine whose model cannot load (missing file): for requests that must be
/// refused before any inference, and for the not-ready paths.
pub async fn failed_engine() -> Engine {
    let engine = Engine::start(engine_config(PathBuf::from("/nonexistent/model.pt"), 2)).unwrap();
    assert!(engine.wait_ready().await.is_err());
    engine
}

pub const DEFAULT_LIMITS: Limits =
    Limits { max_upload_bytes: 16 * 1024 * 1024, max_pixels: 1_000_000, upload_timeout: Duration::from_secs(30) };

pub fn state(engine: Engine, limits: Limits) -> AppState {
    AppState {
        engine,
        limits,
        static_dir: repo().join("static"),
        data_dir: repo().join("data"),
        uploads: stereo_recon::pipeline::UploadBudget::new(1 << 30),
        origins: Default::default(),
        connections: Default::default(),
        connection_stats: Default::default(),
        metrics: Default::default(),
        api_keys: Default::default(),
        streams: stereo_recon::api::stream::Streams::new(4, Duration::from_secs(60)),
    }
}

pub fn app(engine: Engine) -> Router {
    stereo_recon::router(state(engine, DEFAULT_LIMITS))
}

/// A response, fully read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        let json = self.json();
        assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no error message: {json}");
        json["error"]["code"].as_str().unwrap_or_default().to_owned()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply { status, headers, body }
}

pub async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

pub use loadgen::multipart;

pub fn multipart_request(uri: &str, fields: &[(&str, &[u8])]) -> Request<Body> {
    let (content_type, body) = multipart(fields);
    Request::post(uri).header("content-type", content_type).body(Body::from(body)).unwrap()
}

pub fn json_request(uri: &str, json: &serde_json::Value) -> Request<Body> {
    Request::post(uri).header("content-type", "application/json").body(Body::from(json.to_string())).unwrap()
}

pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn png(image: &RgbImage) -> Vec<u8> {
    encode(&DynamicImage::ImageRgb8(image.clone()), ImageFormat::Png)
}

pub fn read_png(path: &str) -> Vec<u8> {
    std::fs::read(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The committed 300 x 250 crop of the synthetic pair (not a multiple of 16).
pub fn fixture_pair() -> (Vec<u8>, Vec<u8>) {
    (read_png("tests/fixtures/synthetic_crop/left.png"), read_png("tests/fixtures/synthetic_crop/right.png"))
}

/// A small textured pair (crop of the synthetic left view, 64 x 48): cheap to infer.
pub fn small_pair() -> (Vec<u8>, Vec<u8>) {
    let source = image::load_from_memory(&read_png("data/synthetic/left.png")).unwrap().to_rgb8();
    let left = image::imageops::crop_imm(&source, 200, 200, 64, 48).to_image();
    let right = image::imageops::crop_imm(&source, 204, 200, 64, 48).to_image();
    (png(&left), png(&right))
}

/// A pair whose right image is the left one moved `shift` pixels to the left:
/// every left pixel `x` is seen at `x - shift` on the right, so the true
/// disparity is `shift` everywhere (a fronto-parallel textured plane).
pub fn shifted_pair(width: u32, height: u32, shift: u32) -> (RgbImage, RgbImage) {
    let source = image::load_from_memory(&read_png("data/synthetic/left.png")).unwrap().to_rgb8();
    let (x0, y0) = (40, 100);
    let left = image::imageops::crop_imm(&source, x0, y0, width, height).to_image();
    let right = image::imageops::crop_imm(&source, x0 + shift, y0, width, height).to_image();
    (left, right)
}

/// A small rendered scene (256 x 192, a room 1.3 to 6 m deep seen by a 0.1 m
/// baseline rig), for API and CLI tests that need depth: fast on CPU.
pub struct SmallScene {
    pub left: Vec<u8>,
    pub right: Vec<u8>,
    pub calibration: stereo_recon::calibration::Calibration,
    /// The exact disparity of the left view (+inf where a ray hits nothing).
    pub truth: stereo_recon::disparity::DisparityMap,
}

pub fn small_scene() -> SmallScene {
    scene(256, 192)
}

/// The rendered room at any size, with its calibration and exact disparity.
pub fn scene(width: u32, height: u32) -> SmallScene {
    let pair = stereo_recon::synthetic::render(width, height);
    let k = pair.intrinsics;
    let calibration = stereo_recon::calibration::formats::read_json(&format!(
        r#"{{"image_size": [{width}, {height}], "units": "m",
            "left": {{"K": [[{f}, 0, {cx}], [0, {f}, {cy}], [0, 0, 1]]}},
            "right": {{"K": [[{f}, 0, {cx}], [0, {f}, {cy}], [0, 0, 1]]}},
            "R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "T": [-0.1, 0, 0]}}"#,
        f = k.fx,
        cx = k.cx,
        cy = k.cy
    ))
    .unwrap();
    SmallScene { left: png(&pair.left), right: png(&pair.right), calibration, truth: pair.disparity }
}

/// A PLY parsed by a standard reader (ply-rs), or the test fails.
pub fn read_ply(bytes: &[u8]) -> ply_rs::ply::Ply<ply_rs::ply::DefaultElement> {
    let parser = ply_rs::parser::Parser::<ply_rs::ply::DefaultElement>::new();
    parser.read_ply(&mut std::io::BufReader::new(bytes)).expect("a standard PLY reader parses it")
}

/// Standard base64 of `bytes`, for JSON request bodies.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes of a base64 string in a JSON answer (`images.*`).
pub fn unb64(value: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    let text = value.as_str().unwrap_or_else(|| panic!("not a base64 string: {value}"));
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}
