//! Read-only endpoints: health, model description, sample pairs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::error::{ErrorAnswer, ErrorObject};
use super::AppState;
use crate::decode::SUPPORTED_FORMATS;
use crate::engine::{EngineError, EngineStatus, ModelInfo};
use crate::pipeline::OutputFormat;
use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};

/// `GET /api/v1/health`'s answer: ready (with the load), or why not.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthAnswer {
    pub status: HealthStatus,
    /// Where the model runs (ready only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads: Option<UploadHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionHealth>,
    /// Why the server cannot serve (loading or failed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorObject>,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Loaded and warmed up: requests are served.
    Ready,
    /// Loading the model or warming it up.
    Loading,
    /// The model could not be loaded; this server will never serve.
    Failed,
}

/// The inference queue: its size and what went through it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueHealth {
    /// Requests that may wait behind the running one (`--queue-depth`).
    pub depth: usize,
    /// Requests holding a place now (running or waiting).
    pub in_flight: usize,
    /// Places in all: the running job plus `depth`.
    pub capacity: usize,
    pub completed: u64,
    pub failed: u64,
    /// Jobs skipped because their client went away first.
    pub abandoned: u64,
}

/// The memory budget for uploads being received and decoded.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadHealth {
    pub bytes_in_flight: u64,
    pub budget_bytes: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectionHealth {
    /// TCP connections open now.
    pub open: usize,
    /// `--max-connections`.
    pub max: usize,
}

/// Whether requests are served now, and the load.
#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "service",
    responses(
        (status = 200, description = "Ready: the model is loaded and warmed up.", body = HealthAnswer),
        (status = 503, description = "Not ready: loading (retry) or failed (see the server log).", body = HealthAnswer),
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let not_ready = |status, code: &str, message: &str| {
        let error = ErrorObject { code: code.into(), message: message.into(), request_id: None };
        let answer =
            HealthAnswer { status, device: None, queue: None, uploads: None, connections: None, error: Some(error) };
        (StatusCode::SERVICE_UNAVAILABLE, Json(answer)).into_response()
    };
    match state.engine.status() {
        EngineStatus::Ready(info) => {
            let stats = state.engine.stats();
            Json(HealthAnswer {
                status: HealthStatus::Ready,
                device: Some(info.device.clone()),
                queue: Some(QueueHealth {
                    depth: state.engine.queue_depth(),
                    in_flight: stats.in_flight,
                    capacity: stats.capacity,
                    completed: stats.completed,
                    failed: stats.failed,
                    abandoned: stats.abandoned,
                }),
                uploads: Some(UploadHealth {
                    bytes_in_flight: state.uploads.in_use_bytes(),
                    budget_bytes: state.uploads.total_bytes(),
                }),
                connections: Some(ConnectionHealth {
                    open: state.connection_stats.open.load(std::sync::atomic::Ordering::Relaxed),
                    max: state.connections.max_connections,
                }),
                error: None,
            })
            .into_response()
        }
        EngineStatus::Loading => {
            not_ready(HealthStatus::Loading, "model_loading", "the model is loading and warming up")
        }
        EngineStatus::Failed(why) => {
            tracing::error!(%why, "health check: model failed to load");
            not_ready(HealthStatus::Failed, "engine_unavailable", "the model failed to load; see the server log")
        }
    }
}

/// `GET /api/v1/model`'s answer: the model's description, then its inputs and outputs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelAnswer {
    #[serde(flatten)]
    pub info: ModelInfo,
    /// Size rules, normalisation, limits and the image formats read.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// The answer formats and their conventions.
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
}

/// The model, its device and what inputs it takes.
#[utoipa::path(
    get,
    path = "/api/v1/model",
    tag = "service",
    responses(
        (status = 200, description = "The loaded model.", body = ModelAnswer),
        (status = 503, description = "No model yet (`model_loading`) or none will load (`engine_unavailable`).", body = ErrorAnswer),
    )
)]
pub async fn model(State(state): State<AppState>) -> Result<Response, super::ApiError> {
    let info = state.model_info().ok_or(match state.engine.status() {
        EngineStatus::Failed(why) => EngineError::Load(why),
        _ => EngineError::NotReady,
    })?;
    let formats: Vec<String> = SUPPORTED_FORMATS.iter().map(|f| format!("{f:?}").to_uppercase()).collect();
    let input = json!({
        "size_multiple": info.size_multiple,
        "min_size": info.min_size,
        "padding": "zeros at the top and on the right, after normalisation; the prediction is cropped back",
        "normalisation": { "scale": "RGB / max value (255 or 65535)", "mean": IMAGENET_MEAN, "std": IMAGENET_STD },
        "max_pixels": state.limits.max_pixels,
        "max_upload_bytes": state.limits.max_upload_bytes,
        "formats": formats,
        "channels": "grey, RGB and RGBA (alpha dropped), 8 or 16 bits",
    });
    let output = json!({
        "disparity": "pixels of the left image; the point at (x, y) appears at (x - d, y) on the right",
        "formats": OutputFormat::labels(false),
        "png16": "KITTI convention: uint16 = round(d * 256), 0 = no value",
        "uncertainty": "float32 PFM of the disparity's per-pixel standard deviation, px",
        "with_calibration": {
            "formats": OutputFormat::labels(true),
            "calibration_formats": ["json", "opencv_yaml", "kitti", "middlebury"],
            "depth": "float32 PFM in the calibration's units, +inf = none",
            "depth16": "16-bit PNG in millimetres, 0 = none",
            "ply": "binary little-endian PLY, x y z float + red green blue uchar, left camera frame",
            "depth_uncertainty": "float32 PFM of the depth's standard deviation, Z^2 / (f B) * sigma, calibration units",
        },
    });
    Ok(Json(ModelAnswer { info: (*info).clone(), input, output }).into_response())
}

/// A sample pair shipped in the data folder, as URLs under `/data`.
#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Example {
    pub name: String,
    pub left: String,
    pub right: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ground_truth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
}

/// Every sub-folder of `data_dir` holding `left.png` and `right.png`, by name.
pub fn list_examples(data_dir: &std::path::Path) -> Vec<Example> {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return Vec::new() };
    let mut examples: Vec<Example> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("left.png").is_file() && e.path().join("right.png").is_file())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let url = |file: &str| format!("/data/{name}/{file}");
            let optional = |file: &str| e.path().join(file).is_file().then(|| url(file));
            Some(Example {
                left: url("left.png"),
                right: url("right.png"),
                ground_truth: optional("disp_gt.pfm"),
                calibration: optional("calib.json"),
                name,
            })
        })
        .collect();
    examples.sort_by(|a, b| a.name.cmp(&b.name));
    examples
}

/// `GET /api/v1/examples`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExamplesAnswer {
    pub examples: Vec<Example>,
}

/// The sample pairs shipped with the server (for the page's "try an example").
#[utoipa::path(
    get,
    path = "/api/v1/examples",
    tag = "service",
    responses((status = 200, description = "Every sample pair, by name.", body = ExamplesAnswer))
)]
pub async fn examples(State(state): State<AppState>) -> Json<ExamplesAnswer> {
    Json(ExamplesAnswer { examples: list_examples(&state.data_dir) })
}
