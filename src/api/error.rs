//! The API's error type: every failure a client can cause or meet, one status each.
//!
//! Errors answer `{"error": {"code": "...", "message": "..."}}` (under `/v2`,
//! the Open Inference Protocol's `{"error": "..."}`), written in one place,
//! [`write_error_bodies`]. `code` is a stable machine-readable word; `message`
//! is plain language for a person. Internal details (libtorch messages,
//! panics) are logged, never sent.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::request_id::RequestId;

use crate::calibration::CalibrationError;
use crate::decode::{DecodeError, PairError};
use crate::engine::{EngineError, SizeMismatch};
use crate::eval::GroundTruthError;
use crate::pipeline::PipelineError;

/// Client text echoed in an error message, cut to a readable length: a 10 MB
/// field name must not become a 10 MB error.
pub fn echo(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    match text.char_indices().nth(MAX_CHARS) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Every `error.code` a client can receive, with its status and meaning: the
/// OpenAPI document's list (a test checks each [`ApiError`] variant's code is here).
/// Besides [`ApiError`], the connection layer answers `too_many_connections`, and
/// errors made under the file services get a code from their status's reason.
pub const ERROR_CODES: &[(&str, u16, &str)] = &[
    ("missing_field", 400, "the 'left' or 'right' image is missing"),
    ("duplicate_field", 400, "a field was sent twice"),
    ("unexpected_field", 400, "a field other than left, right, ground_truth, calibration"),
    ("empty_image", 400, "an image file is empty"),
    ("invalid_image", 400, "an image is not a recognised format or cannot be decoded"),
    ("unsupported_image_format", 415, "an image format we do not read (e.g. GIF)"),
    ("too_many_pixels", 413, "an image (or its padded network input) is over the pixel limit"),
    ("size_mismatch", 400, "left and right differ in size"),
    ("invalid_ground_truth", 400, "the ground truth is not a readable PFM or PNG disparity"),
    ("ground_truth_size_mismatch", 400, "the ground truth's size differs from the images'"),
    ("calibration_size_mismatch", 400, "the calibration is for another image size"),
    ("unsupported_calibration", 400, "a calibration we cannot use (e.g. vertical rig)"),
    ("invalid_calibration", 400, "the calibration cannot be read or is inconsistent"),
    ("calibration_required", 400, "format depth, depth16, ply or depth_uncertainty without a calibration"),
    ("ground_truth_needs_rectified_pair", 400, "ground truth sent with a pair the server must rectify"),
    ("invalid_scale", 400, "a scale outside 0.25 to 1"),
    ("scale_with_ground_truth", 400, "a ground truth sent with scale below 1 (scores are at full size)"),
    ("invalid_base64", 400, "a JSON image field is not base64"),
    ("invalid_json", 400, "the JSON body is malformed"),
    ("invalid_multipart", 400, "the multipart body is malformed"),
    ("invalid_query", 400, "an unknown or invalid query parameter"),
    ("body_too_large", 413, "the body is over --max-upload-bytes (declared, chunked or received)"),
    ("upload_timeout", 408, "the body did not arrive within --upload-timeout-secs"),
    ("unsupported_media_type", 415, "a Content-Type other than multipart/form-data or application/json"),
    ("model_loading", 503, "the model is still loading (Retry-After)"),
    ("queue_full", 503, "every place in the inference queue is taken (Retry-After)"),
    ("engine_unavailable", 503, "the model failed to load or the engine stopped"),
    ("out_of_memory", 503, "the device ran out of memory for this input (Retry-After)"),
    ("inference_failed", 500, "the inference failed; the detail is in the server log"),
    ("upload_budget_full", 503, "the memory budget for uploads is taken (Retry-After)"),
    ("too_many_connections", 503, "every connection is busy (sent by the connection layer, Retry-After)"),
    ("unsupported_transfer_coding", 501, "a Transfer-Encoding other than chunked"),
    ("not_a_websocket", 400, "GET /api/v1/stream without a WebSocket handshake (version 13)"),
    ("too_many_streams", 503, "--max-streams streams are open (Retry-After)"),
    ("unauthorized", 401, "no API key, or not one of the server's (--api-key); the answer says which"),
    ("cross_origin_forbidden", 403, "a browser page of another origin, not in --cors-allow-origin"),
    ("not_found", 404, "no such route or file"),
    ("method_not_allowed", 405, "the route exists but not for this method"),
    ("range_not_satisfiable", 416, "a file's Range header is outside the file"),
    ("uri_too_long", 414, "a request line too long to read (sent by the connection layer)"),
    ("request_header_fields_too_large", 431, "request headers too large to read (sent by the connection layer)"),
    ("bad_request", 400, "a request head that cannot be parsed (sent by the connection layer)"),
    ("internal_error", 500, "an unexpected server error; the detail is in the server log"),
];

/// The body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorAnswer {
    pub error: ErrorObject,
}

/// What went wrong, for a program (`code`) and for a person (`message`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorObject {
    #[schema(value_type = ErrorCode)]
    pub code: String,
    pub message: String,
    /// The request's ID (also in the `x-request-id` header), to match the server's log line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The stable error codes ([`ERROR_CODES`]), as a string enum with their statuses.
pub struct ErrorCode;

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let table: Vec<String> =
            ERROR_CODES.iter().map(|(code, status, what)| format!("- `{code}` ({status}): {what}")).collect();
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(ERROR_CODES.iter().map(|(code, _, _)| *code)))
            .description(Some(format!("A stable, machine-readable word:\n{}", table.join("\n"))))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {}

/// Which upload a per-image error is about.
pub type FieldName = &'static str;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request has no '{0}' image (send both 'left' and 'right')")]
    MissingField(FieldName),
    #[error("the '{0}' image was sent more than once")]
    DuplicateField(FieldName),
    #[error("unexpected field '{0}': send the images as 'left' and 'right' (optional: 'ground_truth', 'calibration')")]
    UnexpectedField(String),
    /// What the pipeline refused or failed at (decoding, sizes, calibration, the engine).
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("the '{0}' field is not valid base64")]
    InvalidBase64(FieldName),
    #[error("the JSON body is invalid: {0}")]
    InvalidJson(String),
    #[error("the multipart body is invalid: {0}")]
    InvalidMultipart(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("the request body did not arrive within {seconds} s")]
    UploadTimeout { seconds: u64 },
    #[error("the request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("unsupported content type '{0}': send multipart/form-data or application/json")]
    UnsupportedMediaType(String),
    #[error("transfer coding '{0}' is not supported: send the body as is or chunked")]
    UnsupportedTransferCoding(String),
    #[error("requests from the page at origin '{0}' are not allowed here (the server's --cors-allow-origin lists the allowed ones)")]
    CrossOrigin(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAWebSocket(String),
    #[error("{limit} streams are open, the most this server takes (--max-streams); retry later")]
    TooManyStreams { limit: usize },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The pipeline's parts' errors reach the API through the pipeline's.
macro_rules! through_pipeline {
    ($($from:ty),*) => {$(
        impl From<$from> for ApiError {
            fn from(e: $from) -> ApiError {
                ApiError::Pipeline(e.into())
            }
        }
    )*};
}
through_pipeline!(PairError, SizeMismatch, GroundTruthError, CalibrationError, EngineError);

impl ApiError {
    /// The one place that maps errors to HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingField(_)
            | ApiError::DuplicateField(_)
            | ApiError::UnexpectedField(_)
            | ApiError::InvalidBase64(_)
            | ApiError::InvalidJson(_)
            | ApiError::InvalidMultipart(_)
            | ApiError::InvalidQuery(_)
            | ApiError::NotAWebSocket(_) => StatusCode::BAD_REQUEST,
            ApiError::TooManyStreams { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Pipeline(e) => pipeline_status(e),
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UploadTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::CrossOrigin(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingField(_) => "missing_field",
            ApiError::DuplicateField(_) => "duplicate_field",
            ApiError::UnexpectedField(_) => "unexpected_field",
            ApiError::Pipeline(e) => pipeline_code(e),
            ApiError::InvalidBase64(_) => "invalid_base64",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidMultipart(_) => "invalid_multipart",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UploadTimeout { .. } => "upload_timeout",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::CrossOrigin(_) => "cross_origin_forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::NotAWebSocket(_) => "not_a_websocket",
            ApiError::TooManyStreams { .. } => "too_many_streams",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// What the client is told. Server-side failures get a generic sentence;
    /// their detail goes to the log.
    pub(super) fn public_message(&self) -> String {
        match self {
            ApiError::Pipeline(PipelineError::Engine(EngineError::Inference(_))) => {
                "inference failed on the server; the error was logged. Try again, or with a smaller image.".into()
            }
            ApiError::Pipeline(PipelineError::Engine(EngineError::OutOfMemory(_))) => {
                "the server ran out of memory for this image; try a smaller image or retry shortly".into()
            }
            ApiError::Pipeline(PipelineError::Engine(EngineError::QueueFull { .. })) => {
                "the server is busy: too many requests are waiting; retry after the Retry-After delay".into()
            }
            ApiError::Pipeline(PipelineError::Engine(EngineError::Load(_) | EngineError::Stopped)) => {
                "the model is unavailable on this server; the error was logged".into()
            }
            ApiError::Internal(_) | ApiError::Pipeline(PipelineError::Internal(_)) => {
                "internal server error; the error was logged".into()
            }
            other => other.to_string(),
        }
    }

    /// Seconds a client should wait before retrying, for the 503s that pass.
    pub(super) fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Pipeline(PipelineError::Engine(EngineError::QueueFull { retry_after_secs, .. })) => {
                Some(*retry_after_secs)
            }
            ApiError::Pipeline(PipelineError::Engine(EngineError::NotReady | EngineError::OutOfMemory(_))) => Some(5),
            ApiError::Pipeline(PipelineError::BudgetFull { .. }) => Some(1),
            ApiError::TooManyStreams { .. } => Some(5),
            _ => None,
        }
    }
}

impl ApiError {
    /// Logs the error as it deserves: failures at ERROR with their detail,
    /// refusals (back-pressure included) at DEBUG.
    pub(super) fn log(&self) {
        if matches!(
            self,
            ApiError::Pipeline(
                PipelineError::Engine(EngineError::QueueFull { .. } | EngineError::NotReady)
                    | PipelineError::BudgetFull { .. }
            )
        ) {
            // Back-pressure is normal operation, not a failure: the request log line shows the 503.
            tracing::debug!(code = self.code(), "request refused: busy");
        } else if self.status().is_server_error() {
            tracing::error!(code = self.code(), detail = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), detail = %self, "request refused");
        }
    }
}

/// The HTTP status of each pipeline error.
fn pipeline_status(e: &PipelineError) -> StatusCode {
    match e {
        PipelineError::SizeMismatch(_)
        | PipelineError::InvalidGroundTruth(_)
        | PipelineError::GroundTruthSizeMismatch { .. }
        | PipelineError::Calibration(_)
        | PipelineError::CalibrationRequired(_)
        | PipelineError::GroundTruthNeedsRectifiedPair
        | PipelineError::InvalidScale(_)
        | PipelineError::ScaleWithGroundTruth => StatusCode::BAD_REQUEST,
        PipelineError::Image { source, .. } => match source {
            DecodeError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            DecodeError::UnsupportedFormat(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            DecodeError::Empty | DecodeError::UnknownFormat | DecodeError::Corrupt(_) => StatusCode::BAD_REQUEST,
        },
        PipelineError::PaddedTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        PipelineError::BudgetFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
        PipelineError::Engine(e) => match e {
            EngineError::NotReady
            | EngineError::QueueFull { .. }
            | EngineError::Stopped
            | EngineError::Load(_)
            | EngineError::OutOfMemory(_) => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        PipelineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The stable code of each pipeline error.
fn pipeline_code(e: &PipelineError) -> &'static str {
    match e {
        PipelineError::Image { source, .. } => match source {
            DecodeError::Empty => "empty_image",
            DecodeError::UnknownFormat | DecodeError::Corrupt(_) => "invalid_image",
            DecodeError::UnsupportedFormat(_) => "unsupported_image_format",
            DecodeError::TooManyPixels { .. } => "too_many_pixels",
        },
        PipelineError::SizeMismatch(_) => "size_mismatch",
        PipelineError::InvalidGroundTruth(_) => "invalid_ground_truth",
        PipelineError::GroundTruthSizeMismatch { .. } => "ground_truth_size_mismatch",
        PipelineError::Calibration(e) => match e {
            CalibrationError::SizeMismatch { .. } => "calibration_size_mismatch",
            CalibrationError::Unsupported(_) => "unsupported_calibration",
            CalibrationError::UnknownFormat | CalibrationError::Syntax { .. } | CalibrationError::Invalid(_) => {
                "invalid_calibration"
            }
        },
        PipelineError::CalibrationRequired(_) => "calibration_required",
        PipelineError::GroundTruthNeedsRectifiedPair => "ground_truth_needs_rectified_pair",
        PipelineError::InvalidScale(_) => "invalid_scale",
        PipelineError::ScaleWithGroundTruth => "scale_with_ground_truth",
        PipelineError::PaddedTooLarge { .. } => "too_many_pixels",
        PipelineError::BudgetFull { .. } => "upload_budget_full",
        PipelineError::Engine(e) => match e {
            EngineError::NotReady => "model_loading",
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::Stopped | EngineError::Load(_) => "engine_unavailable",
            EngineError::OutOfMemory(_) => "out_of_memory",
            EngineError::Inference(_) => "inference_failed",
        },
        PipelineError::Internal(_) => "internal_error",
    }
}

impl IntoResponse for ApiError {
    /// The status, headers and [`ErrorBody`]; [`write_error_bodies`] writes the body.
    fn into_response(self) -> Response {
        self.log();
        let retry_after = self.retry_after();
        let mut response =
            ErrorBody { code: self.code().into(), message: self.public_message() }.into_response_with(self.status());
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// An error answer's code and message, kept on the answer until
/// [`write_error_bodies`] writes them in the protocol's shape (and the metrics
/// count the code).
#[derive(Debug, Clone)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    /// An answer of `status` carrying this error (its body written later).
    pub fn into_response_with(self, status: StatusCode) -> Response {
        let mut response = status.into_response();
        response.extensions_mut().insert(self);
        response
    }

    /// For an error answer made below our handlers (the file services' 404 or
    /// 416, an extractor's rejection): a code from the status's reason.
    fn from_status(status: StatusCode, path: &str) -> ErrorBody {
        let reason = status.canonical_reason().unwrap_or("error");
        let code = reason.to_ascii_lowercase().replace([' ', '-'], "_");
        let message = match status {
            StatusCode::NOT_FOUND => format!("no such file or endpoint: {path}"),
            _ => format!("{reason}: {path}"),
        };
        ErrorBody { code, message }
    }
}

/// The two shapes of error bodies: ours, and the Open Inference Protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorShape {
    /// `{"error": {"code", "message", "request_id"}}`
    Api,
    /// `{"error": "message"}` (everything under `/v2`)
    OpenInference,
}

impl ErrorShape {
    fn of(path: &str) -> ErrorShape {
        if path == "/v2" || path.starts_with("/v2/") {
            ErrorShape::OpenInference
        } else {
            ErrorShape::Api
        }
    }

    fn body(self, error: &ErrorBody, request_id: Option<&str>) -> Vec<u8> {
        let document = match self {
            ErrorShape::Api => serde_json::to_value(ErrorAnswer {
                error: ErrorObject {
                    code: error.code.clone(),
                    message: error.message.clone(),
                    request_id: request_id.map(str::to_owned),
                },
            })
            .expect("an error object serialises"),
            ErrorShape::OpenInference => serde_json::json!({ "error": error.message }),
        };
        serde_json::to_vec(&document).expect("JSON serialises")
    }
}

fn is_json(response: &Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"application/json"))
}

/// Middleware: the one place error bodies are written. Every 4xx and 5xx
/// answer made from an [`ErrorBody`] gets a JSON body in the shape of its
/// route's protocol, with the request ID in ours; errors from below our
/// handlers (file services, extractors) get a code from their status. A
/// handler's own JSON document (health's) is left as it is.
pub async fn write_error_bodies(request: Request, next: Next) -> Response {
    let shape = ErrorShape::of(request.uri().path());
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone());
    let path = echo(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let error = match response.extensions().get::<ErrorBody>() {
        Some(error) => error.clone(),
        // A handler's own JSON document for a status (health's 503 says what is loading).
        None if is_json(&response) => return response,
        None => ErrorBody::from_status(status, &path),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_RANGE);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = shape.body(&error, request_id.as_deref());
    parts.extensions.insert(error);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_are_not_leaked() {
        let e = ApiError::from(EngineError::Inference("CUDA kernel crashed at 0xdeadbeef".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.public_message().contains("0xdeadbeef"));
    }

    #[test]
    fn decode_errors_map_to_distinct_statuses() {
        let image = |source| ApiError::Pipeline(PipelineError::Image { field: "left", source });
        assert_eq!(image(DecodeError::Empty).status(), StatusCode::BAD_REQUEST);
        assert_eq!(image(DecodeError::UnsupportedFormat("GIF".into())).status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let big = DecodeError::TooManyPixels { width: 9, height: 9, pixels: 81, limit: 80 };
        assert_eq!(image(big).status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// One value of every variant (and sub-variant with its own code).
    fn every_error() -> Vec<ApiError> {
        let image = |source| ApiError::Pipeline(PipelineError::Image { field: "left", source });
        let mismatch = SizeMismatch { left_width: 1, left_height: 1, right_width: 2, right_height: 2 };
        vec![
            ApiError::MissingField("left"),
            ApiError::DuplicateField("left"),
            ApiError::UnexpectedField("x".into()),
            image(DecodeError::Empty),
            image(DecodeError::UnknownFormat),
            image(DecodeError::Corrupt("x".into())),
            image(DecodeError::UnsupportedFormat("GIF".into())),
            image(DecodeError::TooManyPixels { width: 9, height: 9, pixels: 81, limit: 80 }),
            ApiError::from(mismatch),
            ApiError::from(GroundTruthError::UnknownFormat),
            ApiError::Pipeline(PipelineError::GroundTruthSizeMismatch {
                truth_width: 1,
                truth_height: 1,
                width: 2,
                height: 2,
            }),
            ApiError::from(CalibrationError::UnknownFormat),
            ApiError::from(CalibrationError::Syntax { format: "JSON", message: "x".into() }),
            ApiError::from(CalibrationError::Invalid("x".into())),
            ApiError::from(CalibrationError::SizeMismatch { calib_width: 1, calib_height: 1, width: 2, height: 2 }),
            ApiError::from(CalibrationError::Unsupported("x".into())),
            ApiError::Pipeline(PipelineError::CalibrationRequired("ply")),
            ApiError::Pipeline(PipelineError::GroundTruthNeedsRectifiedPair),
            ApiError::InvalidBase64("left"),
            ApiError::InvalidJson("x".into()),
            ApiError::InvalidMultipart("x".into()),
            ApiError::InvalidQuery("x".into()),
            ApiError::UploadTimeout { seconds: 1 },
            ApiError::Pipeline(PipelineError::PaddedTooLarge {
                width: 1,
                height: 1,
                padded_width: 1,
                padded_height: 1,
                pixels: 1,
                limit: 0,
            }),
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::from(EngineError::NotReady),
            ApiError::from(EngineError::QueueFull { depth: 1, retry_after_secs: 1 }),
            ApiError::from(EngineError::Stopped),
            ApiError::from(EngineError::Load("x".into())),
            ApiError::from(EngineError::OutOfMemory("x".into())),
            ApiError::from(EngineError::Inference("x".into())),
            ApiError::Pipeline(PipelineError::BudgetFull { budget_bytes: 1 }),
            ApiError::Pipeline(PipelineError::Internal("x".into())),
            ApiError::UnsupportedTransferCoding("gzip".into()),
            ApiError::CrossOrigin("x".into()),
            ApiError::NotFound("x".into()),
            ApiError::MethodNotAllowed("x".into()),
            ApiError::Internal("x".into()),
        ]
    }

    #[test]
    fn every_code_is_documented_with_its_status() {
        for error in every_error() {
            let documented = ERROR_CODES.iter().find(|(code, _, _)| *code == error.code());
            let (_, status, _) = documented.unwrap_or_else(|| panic!("{} is not in ERROR_CODES", error.code()));
            assert_eq!(*status, error.status().as_u16(), "{}", error.code());
        }
    }

    #[test]
    fn each_protocol_has_its_error_shape() {
        let error = ErrorBody { code: "not_found".into(), message: "no such model".into() };
        let ours: serde_json::Value =
            serde_json::from_slice(&ErrorShape::of("/api/v1/x").body(&error, Some("id-1"))).unwrap();
        assert_eq!(
            ours,
            serde_json::json!({ "error": { "code": "not_found", "message": "no such model", "request_id": "id-1" } })
        );
        let v2: serde_json::Value =
            serde_json::from_slice(&ErrorShape::of("/v2/models/x").body(&error, Some("id-1"))).unwrap();
        assert_eq!(v2, serde_json::json!({ "error": "no such model" }));
        assert_eq!(ErrorShape::of("/v2"), ErrorShape::OpenInference);
        assert_eq!(ErrorShape::of("/v2x"), ErrorShape::Api);
    }

    #[test]
    fn queue_full_says_when_to_retry() {
        let response = ApiError::from(EngineError::QueueFull { depth: 2, retry_after_secs: 7 }).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
