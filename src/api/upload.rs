//! Reading the two uploaded images out of a request body.
//!
//! Two encodings are accepted, chosen by `Content-Type`:
//! - `multipart/form-data` with file fields `left` and `right` (browsers, curl -F);
//! - `application/json` `{"left": "<base64>", "right": "<base64>"}` (scripts);
//!   a `data:image/...;base64,` prefix and line breaks in the base64 are tolerated.
//!
//! Either may add an optional `ground_truth` (disparity file) to be scored against,
//! and an optional `calibration` (any format `calibration::parse` reads; in JSON
//! bodies either that file's text or our calibration object itself).
//!
//! Only bytes come out of here; decoding happens elsewhere, off the async threads.

use std::time::Duration;

use axum::body::Body;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use super::error::{echo, ApiError, FieldName};
use crate::server::ConnectionHandle;

/// The raw bytes of both images, as uploaded, and optional ground truth.
#[derive(Debug)]
pub struct UploadedPair {
    pub left: Bytes,
    pub right: Bytes,
    /// Ground-truth disparity (PFM, KITTI 16-bit PNG or 8-bit PNG) to score the result against.
    pub ground_truth: Option<Bytes>,
    /// Calibration file contents, for rectification, depth and point clouds.
    pub calibration: Option<Bytes>,
}

const FIELDS: [FieldName; 4] = ["left", "right", "ground_truth", "calibration"];

/// Reads `left` and `right` from `request`, refusing bodies over `limit` bytes
/// and bodies that take longer than `timeout` to arrive (slow or stalled clients
/// would otherwise hold a connection and its buffers for ever).
pub async fn read_pair(request: Request, limit: usize, timeout: Duration) -> Result<UploadedPair, ApiError> {
    read_within(request, limit, timeout, read_body).await
}

/// The whole body of `request` (any content type), with the same limit,
/// timeout and early 413s as [`read_pair`].
pub async fn read_bytes(request: Request, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    read_within(request, limit, timeout, |request, limit| async move {
        let declared = declared_length(&request);
        whole_body(request.into_body(), declared, limit).await
    })
    .await
}

/// The body's declared length (`Content-Length`), if any.
fn declared_length(request: &Request) -> Option<u64> {
    request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// The whole body, into one buffer sized from its declared length (at most
/// `limit`): collecting into a growing buffer instead held up to twice the body
/// while it was copied to a larger one, more than the upload budget charges.
async fn whole_body(mut body: Body, declared: Option<u64>, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let capacity = declared.map_or(0, |n| n.min(limit as u64) as usize);
    let mut buffer = bytes::BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e, limit))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                return Err(ApiError::BodyTooLarge { limit });
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// Runs `read` on the body with what every upload gets: a declared length over
/// the limit refused before reading anything, the timeout, and a 413 for a
/// chunked body whose chunk lines declare more than the limit (the connection
/// layer fails the body as soon as it sees them, whatever error that surfaces as).
async fn read_within<T, Read, Reading>(
    request: Request,
    limit: usize,
    timeout: Duration,
    read: Read,
) -> Result<T, ApiError>
where
    Read: FnOnce(Request, usize) -> Reading,
    Reading: std::future::Future<Output = Result<T, ApiError>>,
{
    if declared_length(&request).is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let connection = request.extensions().get::<ConnectionHandle>().cloned();
    let read = tokio::time::timeout(timeout, read(request, limit))
        .await
        .map_err(|_| ApiError::UploadTimeout { seconds: timeout.as_secs() })?;
    match read {
        Err(_) if connection.is_some_and(|c| c.declared_oversize().is_some()) => Err(ApiError::BodyTooLarge { limit }),
        read => read,
    }
}

/// A failed body read: 413 when it went over the limit.
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    // A length-limit breach (axum's own limit) comes as the source error.
    if std::error::Error::source(e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
        ApiError::BodyTooLarge { limit }
    } else {
        ApiError::InvalidJson(echo(&format!("could not read the body: {e}")))
    }
}

async fn read_body(request: Request, limit: usize) -> Result<UploadedPair, ApiError> {
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => read_multipart(request, limit).await,
        "application/json" => {
            let declared = declared_length(&request);
            read_json(request.into_body(), declared, limit).await
        }
        "" => Err(ApiError::UnsupportedMediaType("(none)".into())),
        _ => Err(ApiError::UnsupportedMediaType(echo(&content_type))),
    }
}

async fn read_multipart(request: Request, limit: usize) -> Result<UploadedPair, ApiError> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e: MultipartRejection| ApiError::InvalidMultipart(echo(&e.body_text())))?;
    let mut left = None;
    let mut right = None;
    let mut ground_truth = None;
    let mut calibration = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, limit)),
        };
        let name = field.name().unwrap_or("").to_owned();
        let slot = match name.as_str() {
            "left" => &mut left,
            "right" => &mut right,
            "ground_truth" => &mut ground_truth,
            "calibration" => &mut calibration,
            _ => return Err(ApiError::UnexpectedField(echo(&name))),
        };
        let field_name = FIELDS.iter().copied().find(|f| *f == name).expect("matched above");
        if slot.is_some() {
            return Err(ApiError::DuplicateField(field_name));
        }
        *slot = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
    }
    Ok(UploadedPair {
        left: left.ok_or(ApiError::MissingField("left"))?,
        right: right.ok_or(ApiError::MissingField("right"))?,
        ground_truth,
        calibration,
    })
}

fn multipart_error(e: MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit }
    } else {
        ApiError::InvalidMultipart(echo(&e.body_text()))
    }
}

/// A pair as `multipart/form-data` (browsers, `curl -F left=@l.png -F right=@r.png`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documents what `read_multipart` reads
pub struct PairForm {
    /// The left image: PNG, JPEG, BMP, TIFF or WebP; grey, RGB or RGBA; 8 or 16 bits.
    #[schema(value_type = String, format = Binary)]
    left: Vec<u8>,
    /// The right image, the same size as the left.
    #[schema(value_type = String, format = Binary)]
    right: Vec<u8>,
    /// Ground-truth disparity to score against: PFM, KITTI 16-bit PNG, or 8-bit PNG (see `gt_scale`).
    #[schema(value_type = Option<String>, format = Binary)]
    ground_truth: Option<Vec<u8>>,
    /// A calibration file: our JSON, OpenCV YAML, KITTI calib or Middlebury calib.txt.
    #[schema(value_type = Option<String>, format = Binary)]
    calibration: Option<Vec<u8>>,
}

/// A pair as JSON, the files in base64 (a `data:` URL prefix and line breaks are accepted).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documents what `read_json` reads
pub struct PairJson {
    /// The left image file, base64.
    #[schema(content_encoding = "base64")]
    left: String,
    /// The right image file, base64.
    #[schema(content_encoding = "base64")]
    right: String,
    /// Ground-truth disparity file, base64.
    #[schema(content_encoding = "base64")]
    ground_truth: Option<String>,
    /// The calibration: a calibration file's text, or our calibration object.
    #[schema(schema_with = calibration_schema)]
    calibration: Option<serde_json::Value>,
}

/// A calibration in a JSON body: a file's text or our calibration object.
fn calibration_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    Schema::OneOf(
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String).description(Some("a calibration file's text")))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some("our calibration object (see docs/api.md)")),
            )
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .build(),
    )
}

#[derive(Deserialize)]
struct JsonPair {
    left: Option<String>,
    right: Option<String>,
    ground_truth: Option<String>,
    calibration: Option<serde_json::Value>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

async fn read_json(body: Body, declared: Option<u64>, limit: usize) -> Result<UploadedPair, ApiError> {
    let bytes = whole_body(body, declared, limit).await?;
    let parsed: JsonPair = serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(echo(&e.to_string())))?;
    if let Some(name) = parsed.other.keys().next() {
        return Err(ApiError::UnexpectedField(echo(name)));
    }
    let left = parsed.left.ok_or(ApiError::MissingField("left"))?;
    let right = parsed.right.ok_or(ApiError::MissingField("right"))?;
    let ground_truth = parsed.ground_truth.map(|gt| decode_base64(&gt, "ground_truth")).transpose()?;
    let calibration = match parsed.calibration {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(text)) => Some(Bytes::from(text)),
        Some(object @ serde_json::Value::Object(_)) => Some(Bytes::from(object.to_string())),
        Some(_) => {
            return Err(ApiError::InvalidJson(
                "'calibration' must be the calibration file's text or a calibration object".into(),
            ))
        }
    };
    Ok(UploadedPair {
        left: decode_base64(&left, "left")?,
        right: decode_base64(&right, "right")?,
        ground_truth,
        calibration,
    })
}

/// Standard base64, with an optional data-URL prefix and embedded whitespace.
pub fn decode_base64(text: &str, field: FieldName) -> Result<Bytes, ApiError> {
    let payload = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map(Bytes::from)
        .map_err(|_| ApiError::InvalidBase64(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_data_urls_and_line_breaks() {
        assert_eq!(&decode_base64("aGVsbG8=", "left").unwrap()[..], b"hello");
        assert_eq!(&decode_base64("data:image/png;base64,aGVs\nbG8=", "left").unwrap()[..], b"hello");
        assert!(matches!(decode_base64("not base64!!", "right"), Err(ApiError::InvalidBase64("right"))));
    }
}
