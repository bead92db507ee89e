//! Read-only endpoints: health, model description, sample pairs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::decode::SUPPORTED_FORMATS;
use crate::engine::{EngineError, EngineStatus};
use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};

/// `GET /api/v1/health`: 200 only when a request would be served now.
pub async fn health(State(state): State<AppState>) -> Response {
    let stats = state.engine.stats();
    let queue = json!({
        "depth": state.engine.queue_depth(),
        "in_flight": stats.in_flight,
        "capacity": stats.capacity,
        "completed": stats.completed,
        "failed": stats.failed,
        "abandoned": stats.abandoned,
    });
    let uploads = json!({
        "bytes_in_flight": state.uploads.in_use_bytes(),
        "budget_bytes": state.uploads.total_bytes(),
    });
    let connections = json!({
        "open": state.connection_stats.open.load(std::sync::atomic::Ordering::Relaxed),
        "max": state.connections.max_connections,
    });
    match state.engine.status() {
        EngineStatus::Ready(info) => {
            Json(json!({ "status": "ready", "device": info.device, "queue": queue, "uploads": uploads, "connections": connections })).into_response()
        }
        EngineStatus::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "loading",
                "error": { "code": "model_loading", "message": "the model is loading and warming up" },
            })),
        )
            .into_response(),
        EngineStatus::Failed(why) => {
            tracing::error!(%why, "health check: model failed to load");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "failed",
                    "error": { "code": "engine_unavailable", "message": "the model failed to load; see the server log" },
                })),
            )
                .into_response()
        }
    }
}

/// `GET /api/v1/model`: the model, its device and what inputs it takes.
pub async fn model(State(state): State<AppState>) -> Result<Response, super::ApiError> {
    let info = state.model_info().ok_or(match state.engine.status() {
        EngineStatus::Failed(why) => EngineError::Load(why),
        _ => EngineError::NotReady,
    })?;
    let formats: Vec<String> = SUPPORTED_FORMATS.iter().map(|f| format!("{f:?}").to_uppercase()).collect();
    let mut body = serde_json::to_value(&*info).expect("ModelInfo serialises");
    body["input"] = json!({
        "size_multiple": info.size_multiple,
        "min_size": info.min_size,
        "padding": "zeros at the top and on the right, after normalisation; the prediction is cropped back",
        "normalisation": { "scale": "RGB / max value (255 or 65535)", "mean": IMAGENET_MEAN, "std": IMAGENET_STD },
        "max_pixels": state.limits.max_pixels,
        "max_upload_bytes": state.limits.max_upload_bytes,
        "formats": formats,
        "channels": "grey, RGB and RGBA (alpha dropped), 8 or 16 bits",
    });
    body["output"] = json!({
        "disparity": "pixels of the left image; the point at (x, y) appears at (x - d, y) on the right",
        "formats": ["json", "png16", "color", "pfm"],
        "png16": "KITTI convention: uint16 = round(d * 256), 0 = no value",
        "with_calibration": {
            "formats": ["depth", "depth16", "ply"],
            "calibration_formats": ["json", "opencv_yaml", "kitti", "middlebury"],
            "depth": "float32 PFM in the calibration's units, +inf = none",
            "depth16": "16-bit PNG in millimetres, 0 = none",
            "ply": "binary little-endian PLY, x y z float + red green blue uchar, left camera frame",
        },
    });
    Ok(Json(body).into_response())
}

/// A sample pair shipped in the data folder.
#[derive(Debug, Serialize, PartialEq)]
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

/// `GET /api/v1/examples`.
pub async fn examples(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "examples": list_examples(&state.data_dir) }))
}
