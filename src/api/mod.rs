//! HTTP surface: routes, shared state, request logging.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the upload page |
//! | `POST /api/v1/disparity` | a pair in, a disparity map out ([`disparity`]) |
//! | `GET /api/v1/stream` | stereo video over a WebSocket, latest frame wins ([`stream`]) |
//! | `GET /api/v1/health` | 200 once the model is loaded and warmed up, 503 before |
//! | `GET /api/v1/model` | what model runs where, and the input constraints |
//! | `GET /api/v1/examples` | sample pairs shipped in `data/` |
//! | `GET /static/*`, `GET /data/*` | page assets, sample images |
//! | `GET /metrics` | Prometheus metrics ([`metrics`]) |
//! | `GET /api/v1/openapi.json`, `GET /docs` | the OpenAPI document and its viewer ([`openapi`]) |
//! | `/v2/...` | the Open Inference Protocol (KServe v2 / Triton REST, [`v2`]) |
//!
//! The page lives here too ([`page`]): it is one more route over the same
//! state, so the dependency runs one way, from this module to the engine.

pub mod auth;
pub mod disparity;
pub mod error;
pub mod guard;
pub mod headers;
mod info;
pub mod metrics;
pub mod openapi;
mod page;
pub use openapi::BinaryFile;
pub mod request_id;
pub mod stream;
pub mod v2;
pub use info::{list_examples as examples_in, Example};
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::services::ServeDir;
use tracing::Instrument;

use crate::engine::{Engine, EngineStatus, ModelInfo};
use crate::pipeline::{Pipeline, Timings, UploadBudget};
use crate::server::{ConnectionLimits, ConnectionStats};
pub use error::ApiError;

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body in bytes (both images together, after base64 for JSON).
    pub max_upload_bytes: usize,
    /// Largest image, in pixels, per image; also bounds the padded network input.
    pub max_pixels: u64,
    /// Longest a client may take to send its request body; slower uploads get 408.
    pub upload_timeout: Duration,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    /// Folder served at `/static` (CSS, JS).
    pub static_dir: PathBuf,
    /// Folder served at `/data` (sample pairs).
    pub data_dir: PathBuf,
    /// Memory budget for uploads being received and decoded.
    pub uploads: UploadBudget,
    /// Browser origins allowed besides the page's own.
    pub origins: guard::OriginPolicy,
    /// Connection-level limits, for [`crate::serve`].
    pub connections: ConnectionLimits,
    /// What the connection layer has done (accepted, evicted, timed out...).
    pub connection_stats: Arc<ConnectionStats>,
    /// The Prometheus series of `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// API keys the routes need (none set: open, the default).
    pub api_keys: auth::ApiKeys,
    /// The WebSocket streams open, and their limits.
    pub streams: stream::Streams,
}

impl AppState {
    /// The refusals due before a byte of an upload is read (our API and the v2
    /// protocol alike): a full inference queue, then the upload memory budget,
    /// charged the declared length (the body limit when chunked) while it is held.
    pub fn admit_upload(&self, headers: &axum::http::HeaderMap) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.admit_upload_times(headers, 1)
    }

    /// [`admit_upload`](Self::admit_upload) for a body that is held `factor`
    /// times over while it is parsed (JSON tensor data: the text and the values).
    pub fn admit_upload_times(
        &self,
        headers: &axum::http::HeaderMap,
        factor: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.engine.check_capacity()?;
        let declared = guard::declared_upload_bytes(headers, self.limits.max_upload_bytes);
        Ok(self.uploads.admit(declared.saturating_mul(factor))?)
    }

    /// The steps from a pair to an answer, over this state's engine, budget and pixel limit.
    pub fn pipeline(&self) -> Pipeline {
        Pipeline { engine: self.engine.clone(), budget: self.uploads.clone(), max_pixels: self.limits.max_pixels }
    }

    /// The loaded model's description, once the engine is ready.
    pub fn model_info(&self) -> Option<Arc<ModelInfo>> {
        match self.engine.status() {
            EngineStatus::Ready(info) => Some(info),
            _ => None,
        }
    }
}

/// When the request reached the server; the disparity handler reports its
/// total time from here.
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

/// The whole application as a router, ready for `axum::serve` or `oneshot` in tests.
pub fn router(state: AppState) -> Router {
    // No directory indexes or redirects (a redirect would drop the /static or
    // /data prefix): a folder is a 404 like any missing file.
    let static_files = ServeDir::new(&state.static_dir).append_index_html_on_directories(false);
    let data_files = ServeDir::new(&state.data_dir).append_index_html_on_directories(false);
    // Multipart framing adds a little to the images; the upload reader enforces
    // the exact limit, this only stops axum's own default (2 MB) from applying.
    let body_limit = DefaultBodyLimit::max(state.limits.max_upload_bytes);
    Router::new()
        .route("/", get(page::index))
        .route("/api/v1/disparity", post(disparity::disparity).layer(body_limit))
        .route("/api/v1/stream", get(stream::stream))
        .route("/api/v1/health", get(info::health))
        .route("/api/v1/model", get(info::model))
        .route("/api/v1/examples", get(info::examples))
        .nest_service("/static", static_files)
        .nest_service("/data", data_files)
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/models/{name}", get(v2::model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(v2::model_metadata))
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/config", get(v2::model_config))
        .route("/v2/models/{name}/versions/{version}/config", get(v2::model_config))
        .route("/v2/models/{name}/versions/{version}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/infer", post(v2::infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(v2::infer))
        .route("/metrics", get(metrics::metrics))
        .route(openapi::DOCUMENT_PATH, get(openapi::document))
        .merge(openapi::docs_page())
        // After routing: an unknown route is a 404 with or without a key, and
        // refusals are counted under the route they were for.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_api_key))
        .route_layer(middleware::from_fn(metrics::mark_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard::origin_policy))
        .layer(middleware::from_fn(guard::refuse_transfer_codings))
        .layer(middleware::from_fn(crate::server::close_after_unread_body))
        .layer(middleware::from_fn(guard::security_headers))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn(error::write_error_bodies))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(middleware::from_fn(request_id::assign))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(error::echo(request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(error::echo(request.method().as_str()))
}

/// Stamps the start time and writes exactly one log line per request, with the
/// phase timings when the handler reported them.
async fn log_request(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    request.extensions_mut().insert(RequestStart(started));
    let id = request.extensions().get::<request_id::RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id::log_safe(&id),
        method = %request.method(),
        path = %request_id::log_safe(request.uri().path()),
        size = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    match response.extensions().get::<Timings>() {
        Some(t) => tracing::info!(
            parent: &span,
            status,
            decode_ms = t.decode_ms,
            queue_ms = t.queue_ms,
            inference_ms = t.inference_ms,
            encode_ms = t.encode_ms,
            total_ms = t.total_ms,
            "request done"
        ),
        None => tracing::info!(parent: &span, status, total_ms = (total_ms * 10.0).round() / 10.0, "request done"),
    }
    response.into_response()
}
