//! The Open Inference Protocol (KServe v2, Triton's HTTP/REST protocol),
//! beside our own API, so KServe, Triton clients and `perf_analyzer` can use
//! this server as they use any model server.
//!
//! | route | what |
//! |---|---|
//! | `GET /v2/health/live`, `GET /v2/health/ready` | 200, or 400 when not ready (the protocol's "4xx = false") |
//! | `GET /v2` | server metadata |
//! | `GET /v2/models/psmnet-kitti2015[/versions/1]` | model metadata: inputs `left`, `right` (UINT8 `[H, W, 3]`), outputs `disparity` and `uncertainty` (FP32 `[H, W]`) |
//! | `GET /v2/models/psmnet-kitti2015[/versions/1]/ready` | 200 / 400 |
//! | `GET /v2/models/psmnet-kitti2015[/versions/1]/config` | Triton's model configuration (read by `perf_analyzer`) |
//! | `POST /v2/models/psmnet-kitti2015[/versions/1]/infer` | one inference |
//!
//! Tensor data comes as JSON (`data`, flat or nested, row-major) or with the
//! binary tensor data extension: an `Inference-Header-Content-Length` header
//! giving the JSON part's length, then each input's bytes in order
//! (`parameters.binary_data_size`); an output asked with
//! `parameters.binary_data: true` (or the request's `binary_data_output`)
//! comes back the same way. Errors are the protocol's `{"error": "..."}`.
//!
//! Two outputs: `disparity` and `uncertainty` (the disparity's per-pixel
//! standard deviation, px). As the protocol says, a request that names no
//! outputs gets all of them; one that names only `disparity` skips the
//! deviation's pass.
//!
//! The inference goes through the same admission as `/api/v1/disparity`: the
//! queue (503 + Retry-After when full), the upload memory budget, the body and
//! pixel limits and the upload timeout.

use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorBody};
use super::upload::read_bytes;
use super::{AppState, RequestStart};
use crate::disparity::DisparityMap;
use crate::engine::EngineStatus;
use crate::pipeline::{self, pool, Options, PairInput, PipelineError};

/// The model's name on this protocol (the engine's, as everywhere).
pub use crate::engine::MODEL_NAME;
/// The one version served.
pub const MODEL_VERSION: &str = "1";
/// The binary extension's header: length of the JSON part of a body.
pub const HEADER_LENGTH: HeaderName = HeaderName::from_static("inference-header-content-length");

/// A protocol error: status, our code (for metrics and logs) and the message.
#[derive(Debug)]
pub struct ProtocolError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<HeaderValue>,
}

impl ProtocolError {
    fn bad_request(message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_inference_request",
            message: message.into(),
            retry_after: None,
        }
    }

    fn unknown_model(name: &str) -> ProtocolError {
        ProtocolError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_model",
            message: format!(
                "unknown model '{}' (this server serves '{MODEL_NAME}' version {MODEL_VERSION})",
                super::error::echo(name)
            ),
            retry_after: None,
        }
    }
}

impl From<ApiError> for ProtocolError {
    /// The shared steps' errors, with their status and public message.
    fn from(e: ApiError) -> ProtocolError {
        e.log();
        ProtocolError {
            status: e.status(),
            code: e.code(),
            message: e.public_message(),
            retry_after: e.retry_after().map(HeaderValue::from),
        }
    }
}

impl IntoResponse for ProtocolError {
    /// The status, headers and [`ErrorBody`]; the body (`{"error": "..."}` under
    /// `/v2`) is written by [`super::error::write_error_bodies`].
    fn into_response(self) -> Response {
        let mut response = ErrorBody { code: self.code.into(), message: self.message }.into_response_with(self.status);
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds);
        }
        response
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "open inference protocol", responses((status = 200, description = "Live (empty body).")))]
pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// Readiness: the model is loaded and warmed up.
#[utoipa::path(
    get,
    path = "/v2/health/ready",
    tag = "open inference protocol",
    responses((status = 200, description = "Ready (empty body)."), (status = 400, description = "Not ready: loading, or the model failed to load.", body = V2Error))
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    readiness(&state)
}

/// 200, or the protocol's "4xx = false" with why in the error body.
fn readiness(state: &AppState) -> Response {
    let (code, message) = match state.engine.status() {
        EngineStatus::Ready(_) => return StatusCode::OK.into_response(),
        EngineStatus::Loading => ("model_loading", "the model is still loading".to_owned()),
        EngineStatus::Failed(_) => ("engine_unavailable", "the model failed to load; the error was logged".to_owned()),
    };
    ErrorBody { code: code.into(), message }.into_response_with(StatusCode::BAD_REQUEST)
}

/// The protocol's error object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V2Error {
    pub error: String,
}

/// `GET /v2`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    /// Protocol extensions: `binary_tensor_data`, `model_configuration`.
    pub extensions: Vec<&'static str>,
}

/// A tensor's name, type and shape (-1: any size).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    pub name: &'static str,
    pub versions: Vec<&'static str>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// Server metadata.
#[utoipa::path(
    get,
    path = "/v2",
    tag = "open inference protocol",
    responses((status = 200, description = "The server's name, version and protocol extensions.", body = ServerMetadata))
)]
pub async fn server_metadata() -> axum::Json<ServerMetadata> {
    axum::Json(ServerMetadata {
        name: "stereo-recon",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec!["binary_tensor_data", "model_configuration"],
    })
}

/// Which model (and version) a route names; only ours exists.
fn check_model(name: &str, version: Option<&str>) -> Result<(), ProtocolError> {
    if name != MODEL_NAME {
        return Err(ProtocolError::unknown_model(name));
    }
    match version {
        None => Ok(()),
        Some(v) if v == MODEL_VERSION => Ok(()),
        Some(v) => Err(ProtocolError {
            status: StatusCode::NOT_FOUND,
            code: "unknown_model",
            message: format!("model '{MODEL_NAME}' has no version '{}' (only {MODEL_VERSION})", super::error::echo(v)),
            retry_after: None,
        }),
    }
}

/// Path parameters: the model name and, on the `/versions/{version}` routes, the version.
#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

/// The model's tensors.
#[utoipa::path(
    get,
    path = "/v2/models/{name}",
    tag = "open inference protocol",
    params(("name" = String, Path, description = "the model's name", example = "psmnet-kitti2015")),
    responses(
        (status = 200, description = "Inputs `left`, `right` (UINT8 `[H, W, 3]`), outputs `disparity` and `uncertainty` (FP32 `[H, W]`, px).", body = ModelMetadata),
        (status = 404, description = "No such model.", body = V2Error),
    )
)]
pub async fn model_metadata(Path(path): Path<ModelPath>) -> Result<axum::Json<ModelMetadata>, ProtocolError> {
    check_model(&path.name, path.version.as_deref())?;
    let image = |name| TensorMetadata { name, datatype: "UINT8", shape: vec![-1, -1, 3] };
    Ok(axum::Json(ModelMetadata {
        name: MODEL_NAME,
        versions: vec![MODEL_VERSION],
        platform: "pytorch_torchscript",
        inputs: vec![image("left"), image("right")],
        outputs: OutputName::ALL
            .iter()
            .map(|o| TensorMetadata { name: o.name(), datatype: "FP32", shape: vec![-1, -1] })
            .collect(),
    }))
}

/// Triton's model configuration extension, which Triton's tools (`perf_analyzer`) read first.
#[utoipa::path(
    get,
    path = "/v2/models/{name}/config",
    tag = "open inference protocol",
    params(("name" = String, Path, description = "the model's name", example = "psmnet-kitti2015")),
    responses(
        (status = 200, description = "Triton's model configuration (inputs, outputs, max_batch_size 0, instance group).", body = Object),
        (status = 404, description = "No such model.", body = V2Error),
    )
)]
pub async fn model_config(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ProtocolError> {
    check_model(&path.name, path.version.as_deref())?;
    let on_gpu = state.model_info().is_some_and(|info| info.device.starts_with("cuda"));
    Ok(axum::Json(json!({
        "name": MODEL_NAME,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "max_batch_size": 0,
        "input": [
            { "name": "left", "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [-1, -1, 3] },
            { "name": "right", "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [-1, -1, 3] },
        ],
        "output": OutputName::ALL
            .iter()
            .map(|o| json!({ "name": o.name(), "data_type": "TYPE_FP32", "dims": [-1, -1] }))
            .collect::<Vec<_>>(),
        "version_policy": { "latest": { "num_versions": 1 } },
        "instance_group": [{ "name": MODEL_NAME, "kind": if on_gpu { "KIND_GPU" } else { "KIND_CPU" }, "count": 1 }],
    }))
    .into_response())
}

/// Whether the model is ready.
#[utoipa::path(
    get,
    path = "/v2/models/{name}/ready",
    tag = "open inference protocol",
    params(("name" = String, Path, description = "the model's name", example = "psmnet-kitti2015")),
    responses(
        (status = 200, description = "Ready (empty body)."),
        (status = 400, description = "Not ready.", body = V2Error),
        (status = 404, description = "No such model.", body = V2Error),
    )
)]
pub async fn model_ready(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Response, ProtocolError> {
    check_model(&path.name, path.version.as_deref())?;
    Ok(readiness(&state))
}

/// An inference request (its JSON part, with the binary extension).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed in the answer.
    id: Option<String>,
    /// `binary_data_output: true` asks every output as binary data.
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: Map<String, Value>,
    /// `left` and `right`.
    inputs: Vec<InputTensor>,
    /// Optional: `disparity` and/or `uncertainty`, each with `parameters.binary_data`
    /// (none named: both).
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

/// An input tensor: UINT8 `[H, W, 3]`, row-major, in `data` or as binary data.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON part.
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: Map<String, Value>,
    /// The values, flat or nested (row-major).
    #[schema(value_type = Option<Vec<u8>>)]
    data: Option<Uint8Data>,
}

/// An output asked for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestedOutput {
    name: String,
    /// `binary_data: true` for the binary extension.
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: Map<String, Value>,
}

/// UINT8 tensor data in JSON: numbers 0 to 255, in nested or flat arrays,
/// read straight into bytes (a `Value` per number would take 32 bytes each).
#[derive(Debug, Default)]
struct Uint8Data(Vec<u8>);

impl<'de> Deserialize<'de> for Uint8Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Flatten<'a>(&'a mut Vec<u8>);

        impl<'de> de::DeserializeSeed<'de> for Flatten<'_> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
                deserializer.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for Flatten<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("UINT8 values (0 to 255) in arrays")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
                let byte = u8::try_from(v).map_err(|_| E::custom(format!("{v} is not a UINT8 value (0 to 255)")))?;
                self.0.push(byte);
                Ok(())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
                Err(E::custom(format!("{v} is not a UINT8 value (0 to 255)")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
                Err(E::custom(format!("{v} is not a UINT8 value (0 to 255)")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Flatten(self.0))?.is_some() {}
                Ok(())
            }
        }

        let mut bytes = Vec::new();
        deserializer.deserialize_any(Flatten(&mut bytes))?;
        Ok(Uint8Data(bytes))
    }
}

/// The body split into its JSON part and the binary data after it.
fn split_body(headers: &HeaderMap, body: &Bytes) -> Result<(Bytes, Bytes), ProtocolError> {
    let Some(value) = headers.get(&HEADER_LENGTH) else {
        return Ok((body.clone(), Bytes::new()));
    };
    let length =
        value.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n <= body.len()).ok_or_else(
            || {
                ProtocolError::bad_request(format!(
                    "Inference-Header-Content-Length must be a length of at most the body's {} bytes",
                    body.len()
                ))
            },
        )?;
    Ok((body.slice(..length), body.slice(length..)))
}

/// An input's pixels and size, checked against its shape and the pixel limit
/// (checked arithmetic: a shape's product may not wrap around).
struct InputImage {
    width: u32,
    height: u32,
    pixels: Bytes,
}

/// Checks one input and takes its pixels (`[H, W, 3]` UINT8): from its JSON
/// data (moved, not copied) or a slice of the binary data (shared, not copied).
fn input_image(tensor: InputTensor, binary: &mut Bytes, max_pixels: u64) -> Result<InputImage, ProtocolError> {
    let name = tensor.name;
    if tensor.datatype != "UINT8" {
        return Err(ProtocolError::bad_request(format!(
            "input '{name}' must be UINT8, not {}",
            super::error::echo(&tensor.datatype)
        )));
    }
    let (height, width) = match tensor.shape[..] {
        [h, w, 3] => match (u32::try_from(h), u32::try_from(w)) {
            (Ok(h), Ok(w)) if h > 0 && w > 0 => (h, w),
            _ => {
                return Err(ProtocolError::bad_request(format!(
                    "input '{name}' has no valid shape [H, W, 3]: {:?}",
                    tensor.shape
                )))
            }
        },
        _ => {
            return Err(ProtocolError::bad_request(format!(
                "input '{name}' must have shape [H, W, 3], not {:?}",
                tensor.shape
            )))
        }
    };
    let pixels = u64::from(height) * u64::from(width);
    if pixels > max_pixels {
        let field = if name == "left" { "left" } else { "right" };
        let source = crate::decode::DecodeError::TooManyPixels { width, height, pixels, limit: max_pixels };
        return Err(ApiError::Pipeline(PipelineError::Image { field, source }).into());
    }
    // Below the pixel limit (a u64 of at most 2^64 / 2^32), three values a pixel cannot overflow.
    let expected = pixels * 3;
    let bytes = match (tensor.data, tensor.parameters.get("binary_data_size")) {
        (Some(_), Some(_)) => {
            return Err(ProtocolError::bad_request(format!("input '{name}' has both JSON data and binary_data_size")))
        }
        (Some(data), None) => Bytes::from(data.0),
        (None, Some(size)) => {
            let size = size.as_u64().filter(|&s| s <= binary.len() as u64).ok_or_else(|| {
                ProtocolError::bad_request(format!(
                    "input '{name}': binary_data_size is not a size within the binary data"
                ))
            })?;
            binary.split_to(size as usize)
        }
        (None, None) => {
            return Err(ProtocolError::bad_request(format!(
                "input '{name}' has no data (JSON 'data' or binary_data_size)"
            )))
        }
    };
    if bytes.len() as u64 != expected {
        return Err(ProtocolError::bad_request(format!(
            "input '{name}' has {} values but its shape [{height}, {width}, 3] needs {expected}",
            bytes.len()
        )));
    }
    Ok(InputImage { width, height, pixels: bytes })
}

/// The pair named `left` and `right`, as the pipeline's input.
fn read_inputs(inputs: Vec<InputTensor>, mut binary: Bytes, max_pixels: u64) -> Result<PairInput, ProtocolError> {
    let mut left = None;
    let mut right = None;
    for tensor in inputs {
        let slot = match tensor.name.as_str() {
            "left" => &mut left,
            "right" => &mut right,
            other => {
                return Err(ProtocolError::bad_request(format!(
                    "unexpected input '{}': this model takes 'left' and 'right'",
                    super::error::echo(other)
                )))
            }
        };
        if slot.is_some() {
            return Err(ProtocolError::bad_request(format!("input '{}' given twice", tensor.name)));
        }
        *slot = Some(input_image(tensor, &mut binary, max_pixels)?);
    }
    let (Some(left), Some(right)) = (left, right) else {
        return Err(ProtocolError::bad_request("this model needs two inputs, 'left' and 'right'"));
    };
    if (left.width, left.height) != (right.width, right.height) {
        let mismatch = crate::decode::SizeMismatch {
            left_width: left.width,
            left_height: left.height,
            right_width: right.width,
            right_height: right.height,
        };
        return Err(ApiError::from(mismatch).into());
    }
    Ok(PairInput::Pixels { width: left.width, height: left.height, left: left.pixels, right: right.pixels })
}

/// The model's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputName {
    Disparity,
    /// The disparity's per-pixel standard deviation, px.
    Uncertainty,
}

impl OutputName {
    const ALL: [OutputName; 2] = [OutputName::Disparity, OutputName::Uncertainty];

    fn name(self) -> &'static str {
        match self {
            OutputName::Disparity => "disparity",
            OutputName::Uncertainty => "uncertainty",
        }
    }
}

/// The outputs to send back, in order, each with whether it goes as binary
/// data: those named (once each), or all when none is.
fn requested_outputs(request: &InferRequest) -> Result<Vec<(OutputName, bool)>, ProtocolError> {
    let request_wide = request.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    if request.outputs.is_empty() {
        return Ok(OutputName::ALL.iter().map(|&o| (o, request_wide)).collect());
    }
    let mut wanted: Vec<(OutputName, bool)> = Vec::with_capacity(request.outputs.len());
    for output in &request.outputs {
        let name = OutputName::ALL.into_iter().find(|o| o.name() == output.name).ok_or_else(|| {
            ProtocolError::bad_request(format!(
                "unknown output '{}': this model has 'disparity' and 'uncertainty'",
                super::error::echo(&output.name)
            ))
        })?;
        if wanted.iter().any(|(o, _)| *o == name) {
            return Err(ProtocolError::bad_request(format!("output '{}' asked for twice", name.name())));
        }
        let binary = output.parameters.get("binary_data").and_then(Value::as_bool).unwrap_or(request_wide);
        wanted.push((name, binary));
    }
    Ok(wanted)
}

/// An output tensor, FP32 `[H, W]`, in `data` or as binary data.
#[derive(Serialize, utoipa::ToSchema)]
pub struct OutputTensor<'a> {
    name: &'static str,
    datatype: &'static str,
    #[schema(value_type = Vec<u32>)]
    shape: [u32; 2],
    /// `binary_data_size` when the values follow the JSON part.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

/// An inference's answer (its JSON part, with the binary extension).
#[derive(Serialize, utoipa::ToSchema)]
pub struct InferResponse<'a> {
    model_name: &'static str,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputTensor<'a>>,
}

/// The answer: JSON, followed (when any output goes as binary data) by those
/// outputs' little-endian float32 bytes, in the order the JSON lists them.
fn encode_answer(
    request_id: Option<&str>,
    outputs: &[(OutputName, bool)],
    disparity: &DisparityMap,
    uncertainty: Option<&DisparityMap>,
) -> Response {
    let map_of = |name| match name {
        OutputName::Disparity => disparity,
        OutputName::Uncertainty => uncertainty.expect("the deviation was asked of the engine"),
    };
    let tensors = outputs
        .iter()
        .map(|&(name, binary)| {
            let map = map_of(name);
            let values = map.values();
            OutputTensor {
                name: name.name(),
                datatype: "FP32",
                shape: [map.height(), map.width()],
                parameters: binary.then(|| json!({ "binary_data_size": values.len() * 4 })),
                data: (!binary).then_some(values),
            }
        })
        .collect();
    let document =
        InferResponse { model_name: MODEL_NAME, model_version: MODEL_VERSION, id: request_id, outputs: tensors };
    let mut body = serde_json::to_vec(&document).expect("the answer serialises");
    if !outputs.iter().any(|(_, binary)| *binary) {
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let json_length = body.len();
    for &(name, _) in outputs.iter().filter(|(_, binary)| *binary) {
        let values = map_of(name).values();
        body.reserve(values.len() * 4);
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (HEADER_LENGTH, HeaderValue::from(json_length)),
        ],
        body,
    )
        .into_response()
}

/// One inference: a pair in, its disparity (and its per-pixel standard deviation) out.
///
/// With the binary tensor data extension, the body is the JSON request of
/// `Inference-Header-Content-Length` bytes followed by the inputs' bytes, and a
/// binary answer is its JSON part (length in the same header) followed by the
/// binary outputs as little-endian float32, in the order the JSON lists them.
/// A request naming no outputs gets both `disparity` and `uncertainty`.
#[utoipa::path(
    post,
    path = "/v2/models/{name}/infer",
    tag = "open inference protocol",
    params(
        ("name" = String, Path, description = "the model's name", example = "psmnet-kitti2015"),
        ("inference-header-content-length" = Option<u64>, Header, description = "binary extension: length of the JSON part"),
    ),
    request_body(content(
        (InferRequest = "application/json"),
        (super::BinaryFile = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The outputs asked for (all when none is named).", content(
            (InferResponse = "application/json"),
            (super::BinaryFile = "application/octet-stream"),
        )),
        (status = 400, description = "An invalid request or tensor.", body = V2Error),
        (status = 404, description = "No such model.", body = V2Error),
        (status = 408, description = "The body took too long.", body = V2Error),
        (status = 413, description = "The body or the images are too large.", body = V2Error),
        (status = 500, description = "The inference failed (logged on the server).", body = V2Error),
        (status = 503, description = "Busy (queue full, upload budget) or not ready.", headers(("retry-after" = u64, description = "seconds to wait")), body = V2Error),
    )
)]
pub async fn infer(
    State(state): State<AppState>,
    Extension(RequestStart(started)): Extension<RequestStart>,
    path: Result<Path<ModelPath>, PathRejection>,
    request: Request,
) -> Result<Response, ProtocolError> {
    let Path(path) = path.map_err(|e| ProtocolError::bad_request(super::error::echo(&e.body_text())))?;
    check_model(&path.name, path.version.as_deref())?;
    // The same admission as /api/v1/disparity, before the body is read. Tensors as
    // JSON numbers are held twice while parsed (the text, then the values with
    // their vectors' growth room: measured 4 x 49 MB bodies at +400 MiB), so such
    // bodies are charged twice; binary tensor data is shared with the body.
    let json_tensors = !request.headers().contains_key(&HEADER_LENGTH);
    let receiving = state.admit_upload_times(request.headers(), if json_tensors { 2 } else { 1 })?;
    let headers = request.headers().clone();
    let body = read_bytes(request, state.limits.max_upload_bytes, state.limits.upload_timeout).await?;
    let max_pixels = state.limits.max_pixels;
    let ParsedRequest { id, outputs, pair } =
        pool::run(move || parse_request(&headers, body, max_pixels)).await.map_err(internal_error)??;

    let options =
        Options { uncertainty: outputs.iter().any(|(name, _)| *name == OutputName::Uncertainty), ..Options::default() };
    let request =
        pipeline::Request { pair, ground_truth: None, calibration: None, options, started, receiving: Some(receiving) };
    let outcome = state.pipeline().run(request).await.map_err(ApiError::from)?;
    let encode_started = Instant::now();
    let (mut response, mut timings) = pool::run(move || {
        let response = encode_answer(id.as_deref(), &outputs, &outcome.disparity, outcome.uncertainty.as_ref());
        (response, outcome.timings)
    })
    .await
    .map_err(internal_error)?;
    timings.add_encode(encode_started.elapsed(), started.elapsed());
    response.headers_mut().insert(super::headers::SERVER_TIMING, super::headers::server_timing(&timings));
    response.extensions_mut().insert(timings);
    Ok(response)
}

/// A step that panicked (logged; the client gets a plain 500).
fn internal_error(why: String) -> ProtocolError {
    ApiError::Internal(why).into()
}

/// An inference request, checked: its ID, the outputs asked for (each with
/// whether it goes as binary data), and the pair.
struct ParsedRequest {
    id: Option<String>,
    outputs: Vec<(OutputName, bool)>,
    pair: PairInput,
}

/// The request's JSON part and binary data, parsed and checked.
fn parse_request(headers: &HeaderMap, body: Bytes, max_pixels: u64) -> Result<ParsedRequest, ProtocolError> {
    let (json_part, binary) = split_body(headers, &body)?;
    let parsed: InferRequest = serde_json::from_slice(&json_part).map_err(|e| {
        ProtocolError::bad_request(format!("invalid inference request: {}", super::error::echo(&e.to_string())))
    })?;
    // The JSON text is gone once parsed; binary inputs share the body's buffer.
    drop((json_part, body));
    let outputs = requested_outputs(&parsed)?;
    let pair = read_inputs(parsed.inputs, binary, max_pixels)?;
    Ok(ParsedRequest { id: parsed.id, outputs, pair })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_data_reads_flat_and_nested_arrays_and_refuses_other_numbers() {
        let flat: Uint8Data = serde_json::from_str("[1, 2, 255]").unwrap();
        assert_eq!(flat.0, vec![1, 2, 255]);
        let nested: Uint8Data = serde_json::from_str("[[[1, 2, 3]], [[4, 5, 6]]]").unwrap();
        assert_eq!(nested.0, vec![1, 2, 3, 4, 5, 6]);
        for bad in ["[256]", "[-1]", "[1.5]", "[\"a\"]"] {
            assert!(serde_json::from_str::<Uint8Data>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_binary_extension_splits_the_body_at_the_header_length() {
        let mut headers = HeaderMap::new();
        let body = Bytes::from_static(b"{\"a\":1}\x01\x02");
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("7"));
        let (json_part, binary) = split_body(&headers, &body).unwrap();
        assert_eq!((&json_part[..], &binary[..]), (&b"{\"a\":1}"[..], &b"\x01\x02"[..]));
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("99"));
        assert!(split_body(&headers, &body).is_err());
    }

    #[test]
    fn outputs_default_to_all_and_are_checked() {
        let request = |json: Value| -> InferRequest { serde_json::from_value(json).unwrap() };
        let none = request(json!({ "inputs": [], "parameters": { "binary_data_output": true } }));
        assert_eq!(
            requested_outputs(&none).unwrap(),
            vec![(OutputName::Disparity, true), (OutputName::Uncertainty, true)]
        );
        let one = request(
            json!({ "inputs": [], "outputs": [{ "name": "uncertainty", "parameters": { "binary_data": true } }] }),
        );
        assert_eq!(requested_outputs(&one).unwrap(), vec![(OutputName::Uncertainty, true)]);
        let twice = request(json!({ "inputs": [], "outputs": [{ "name": "disparity" }, { "name": "disparity" }] }));
        assert!(requested_outputs(&twice).is_err());
        let unknown = request(json!({ "inputs": [], "outputs": [{ "name": "depth" }] }));
        assert!(requested_outputs(&unknown).is_err());
    }

    #[test]
    fn binary_outputs_follow_the_json_in_its_order() {
        let disparity = DisparityMap::new(2, 1, vec![1.0, 2.0]).unwrap();
        let sigma = DisparityMap::new(2, 1, vec![0.5, 0.25]).unwrap();
        let outputs = [(OutputName::Uncertainty, true), (OutputName::Disparity, false)];
        let response = encode_answer(Some("x"), &outputs, &disparity, Some(&sigma));
        let json_length: usize = response.headers()[HEADER_LENGTH].to_str().unwrap().parse().unwrap();
        let body = futures_body(response);
        let document: Value = serde_json::from_slice(&body[..json_length]).unwrap();
        assert_eq!(document["outputs"][0]["name"], "uncertainty");
        assert_eq!(document["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(document["outputs"][1]["data"], json!([1.0, 2.0]));
        let tail: Vec<f32> = body[json_length..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(tail, vec![0.5, 0.25]);
    }

    fn futures_body(response: Response) -> Bytes {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(axum::body::to_bytes(response.into_body(), usize::MAX)).unwrap()
    }

    #[test]
    fn inputs_are_checked_against_their_shape() {
        let tensor = |shape: Vec<i64>, data: Vec<u8>| InputTensor {
            name: "left".into(),
            shape,
            datatype: "UINT8".into(),
            parameters: Map::new(),
            data: Some(Uint8Data(data)),
        };
        let check = |t| input_image(t, &mut Bytes::new(), 1 << 20);
        assert_eq!(check(tensor(vec![1, 2, 3], vec![0; 6])).unwrap().width, 2);
        assert!(check(tensor(vec![1, 2, 3], vec![0; 5])).is_err());
        assert!(check(tensor(vec![2, 3], vec![0; 6])).is_err());
        let mut fp32 = tensor(vec![1, 2, 3], vec![0; 6]);
        fp32.datatype = "FP32".into();
        assert!(check(fp32).is_err());
        // H * W * 3 wraps around in u64 to the number of values sent: refused by the pixel limit first.
        let wrapping = tensor(vec![2_900_561_549, 4_239_809_835, 3], vec![0; 6]);
        let Err(e) = check(wrapping) else { panic!("a wrapping shape is refused") };
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(check(tensor(vec![-1, 2, 3], vec![0; 6])).is_err());
        assert!(check(tensor(vec![i64::MAX, 2, 3], vec![0; 6])).is_err());
    }
}
