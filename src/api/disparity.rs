//! `POST /api/v1/disparity`: a stereo pair in, a disparity map out.

use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, FieldName};
use super::upload::read_pair;
use super::{AppState, RequestStart};
use crate::codec::{colormap, kitti, pfm};
use crate::decode::decode_rgb;
use crate::disparity::{DisparityMap, DisparityStats};
use crate::engine::StereoPair;
use crate::eval::{decode_ground_truth, error_map, evaluate, Metrics};
use crate::preprocess::PadRule;

/// What the client wants back.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// JSON with statistics, timings and base64 PNGs.
    #[default]
    Json,
    /// KITTI 16-bit PNG, `round(d * 256)`.
    Png16,
    /// 8-bit colourised PNG (turbo).
    Color,
    /// float32 Middlebury PFM.
    Pfm,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputParams {
    #[serde(default)]
    format: OutputFormat,
    /// With `format=json`, also include the float PFM (base64); the page uses it
    /// to show the exact value under the cursor.
    #[serde(default)]
    include_pfm: bool,
    /// Scale of an 8-bit ground-truth PNG (disparity = value / scale).
    gt_scale: Option<f32>,
}

/// Where the time of one request went, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub encode_ms: f64,
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

impl Timings {
    /// As a `Server-Timing` header, which browsers' developer tools display.
    fn server_timing(&self) -> String {
        format!(
            "decode;dur={}, queue;dur={}, inference;dur={}, encode;dur={}, total;dur={}",
            self.decode_ms, self.queue_ms, self.inference_ms, self.encode_ms, self.total_ms
        )
    }
}

#[derive(Serialize)]
struct Images {
    color_png: String,
    kitti_png16: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pfm: Option<String>,
    /// KITTI-style error map, when ground truth was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_png: Option<String>,
}

#[derive(Serialize)]
struct DisparityResponse {
    width: u32,
    height: u32,
    disparity: DisparityStats,
    device: String,
    model: String,
    timings_ms: Timings,
    /// Scores against the uploaded ground truth, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    evaluation: Option<Metrics>,
    images: Images,
}

/// The encoded answer, before the total time is known.
enum Encoded {
    Json { color_png: Vec<u8>, kitti_png16: Vec<u8>, pfm: Option<Vec<u8>>, error_png: Option<Vec<u8>> },
    File { bytes: Vec<u8>, content_type: &'static str, file_name: &'static str },
}

/// The answer ready to send: JSON images already in base64.
enum Answer {
    Json(Images),
    File { bytes: Vec<u8>, content_type: &'static str, file_name: &'static str },
}

impl From<Encoded> for Answer {
    fn from(encoded: Encoded) -> Answer {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        match encoded {
            Encoded::Json { color_png, kitti_png16, pfm, error_png } => Answer::Json(Images {
                color_png: b64(&color_png),
                kitti_png16: b64(&kitti_png16),
                pfm: pfm.as_deref().map(b64),
                error_png: error_png.as_deref().map(b64),
            }),
            Encoded::File { bytes, content_type, file_name } => Answer::File { bytes, content_type, file_name },
        }
    }
}

fn encode(format: OutputFormat, include_pfm: bool, map: &DisparityMap, truth: Option<&DisparityMap>) -> Encoded {
    match format {
        OutputFormat::Json => Encoded::Json {
            color_png: colormap::color_png(map),
            kitti_png16: kitti::encode_png16(map),
            pfm: include_pfm.then(|| pfm::encode(map)),
            error_png: truth.map(|truth| {
                let errors = error_map(map, truth);
                crate::codec::png_bytes(errors.as_raw(), map.width(), map.height(), image::ExtendedColorType::Rgb8)
            }),
        },
        OutputFormat::Png16 => Encoded::File {
            bytes: kitti::encode_png16(map),
            content_type: "image/png",
            file_name: "disparity_kitti16.png",
        },
        OutputFormat::Color => Encoded::File {
            bytes: colormap::color_png(map),
            content_type: "image/png",
            file_name: "disparity_color.png",
        },
        OutputFormat::Pfm => Encoded::File {
            bytes: pfm::encode(map),
            content_type: "application/x-portable-floatmap",
            file_name: "disparity.pfm",
        },
    }
}

/// Decodes both uploads in parallel on the blocking pool and pairs them.
async fn decode_pair(left: Bytes, right: Bytes, max_pixels: u64) -> Result<StereoPair, ApiError> {
    let decode = |bytes: Bytes, field: FieldName| {
        tokio::task::spawn_blocking(move || {
            decode_rgb(&bytes, max_pixels).map_err(|source| ApiError::Image { field, source })
        })
    };
    let (left, right) = tokio::join!(decode(left, "left"), decode(right, "right"));
    let joined = |r: Result<_, tokio::task::JoinError>| r.map_err(|e| ApiError::Internal(format!("decode task: {e}")));
    let left = joined(left)??;
    let right = joined(right)??;
    Ok(StereoPair::new(left, right)?)
}

/// The network sees the padded input, so that is what must fit: a 100000 x 1
/// image is small, but padded to 100000 x 256 it is not. The floor of one
/// minimum-size input keeps tiny images (padded to 256 x 256) always allowed.
fn check_padded_size(width: u32, height: u32, max_pixels: u64) -> Result<(), ApiError> {
    let geometry = PadRule::PSMNET.geometry(width, height);
    let pixels = geometry.padded_len() as u64;
    let floor = u64::from(PadRule::PSMNET.min_size).pow(2);
    let limit = max_pixels.max(floor);
    if pixels > limit {
        return Err(ApiError::PaddedTooLarge {
            width,
            height,
            padded_width: geometry.padded_width,
            padded_height: geometry.padded_height,
            pixels,
            limit,
        });
    }
    Ok(())
}

pub async fn disparity(
    State(state): State<AppState>,
    Extension(RequestStart(started)): Extension<RequestStart>,
    query: Result<Query<OutputParams>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| {
        ApiError::InvalidQuery(format!(
            "invalid query ({}); use format=json|png16|color|pfm and optionally include_pfm=true",
            e.body_text()
        ))
    })?;
    if let Err(full) = state.engine.check_capacity() {
        // The body is left unread, so this connection cannot carry another
        // request; say so, and the client opens a fresh one.
        let mut response = ApiError::from(full).into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    }
    let upload = read_pair(request, state.limits.max_upload_bytes, state.limits.upload_timeout).await?;

    let decode_started = Instant::now();
    let max_pixels = state.limits.max_pixels;
    let truth = upload.ground_truth.map(|bytes| {
        let scale = params.gt_scale;
        tokio::task::spawn_blocking(move || decode_ground_truth(&bytes, scale, max_pixels))
    });
    let pair = decode_pair(upload.left, upload.right, max_pixels).await?;
    let (width, height) = pair.dimensions();
    check_padded_size(width, height, max_pixels)?;
    let truth = match truth {
        Some(task) => {
            let truth = task.await.map_err(|e| ApiError::Internal(format!("decode task: {e}")))??;
            if (truth.width(), truth.height()) != (width, height) {
                return Err(ApiError::GroundTruthSizeMismatch {
                    truth_width: truth.width(),
                    truth_height: truth.height(),
                    width,
                    height,
                });
            }
            Some(truth)
        }
        None => None,
    };
    let decode = decode_started.elapsed();
    tracing::Span::current().record("size", format!("{width}x{height}"));

    let prediction = state.engine.predict(pair).await?;
    let info = state.model_info();

    let encode_started = Instant::now();
    let map = prediction.disparity;
    let (format, include_pfm) = (params.format, params.include_pfm);
    // Everything CPU-bound after inference (scores, PNG encoding and, for JSON,
    // base64 of megabytes) runs on the blocking pool, not on an async worker.
    let (answer, stats, evaluation) = tokio::task::spawn_blocking(move || {
        let evaluation = truth.as_ref().map(|truth| evaluate(&map, truth, crate::eval::DEFAULT_MAXDISP));
        (Answer::from(encode(format, include_pfm, &map, truth.as_ref())), map.stats(), evaluation)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("encode task: {e}")))?;
    let encode = encode_started.elapsed();

    let timings = Timings {
        decode_ms: ms(decode),
        queue_ms: ms(prediction.queue),
        inference_ms: ms(prediction.inference),
        encode_ms: ms(encode),
        total_ms: ms(started.elapsed()),
    };
    let device = info.as_ref().map(|i| i.device.clone()).unwrap_or_default();
    let model = info.as_ref().map(|i| i.name.clone()).unwrap_or_default();

    let mut response = match answer {
        Answer::Json(images) => Json(DisparityResponse {
            width,
            height,
            disparity: stats,
            device,
            model,
            timings_ms: timings,
            evaluation,
            images,
        })
        .into_response(),
        Answer::File { bytes, content_type, file_name } => {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            let disposition = format!("inline; filename=\"{file_name}\"");
            headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).expect("ascii"));
            for (name, value) in
                [("x-disparity-min", stats.min), ("x-disparity-max", stats.max), ("x-disparity-mean", stats.mean)]
            {
                headers
                    .insert(HeaderName::from_static(name), HeaderValue::from_str(&value.to_string()).expect("number"));
            }
            headers.insert(
                HeaderName::from_static("x-device"),
                HeaderValue::from_str(&device).unwrap_or(HeaderValue::from_static("unknown")),
            );
            if let Some(m) = evaluation {
                for (name, value) in [("x-eval-epe", m.epe), ("x-eval-d1", m.d1)] {
                    let value = HeaderValue::from_str(&format!("{value:.4}")).expect("number");
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
            (headers, bytes).into_response()
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("server-timing"),
        HeaderValue::from_str(&timings.server_timing()).expect("ascii"),
    );
    response.extensions_mut().insert(timings);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_encodes_to_its_kind_of_file() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        match encode(OutputFormat::Json, true, &map, Some(&map)) {
            Encoded::Json { color_png, kitti_png16, pfm, error_png } => {
                assert!(color_png.starts_with(b"\x89PNG") && kitti_png16.starts_with(b"\x89PNG"));
                assert!(pfm.unwrap().starts_with(b"Pf\n2 2\n"));
                assert!(error_png.unwrap().starts_with(b"\x89PNG"));
            }
            Encoded::File { .. } => panic!("json must not be a file"),
        }
        let Encoded::Json { pfm: None, error_png: None, .. } = encode(OutputFormat::Json, false, &map, None) else {
            panic!("pfm is opt-in, the error map needs ground truth")
        };
        for (format, kind) in [
            (OutputFormat::Png16, "image/png"),
            (OutputFormat::Color, "image/png"),
            (OutputFormat::Pfm, "application/x-portable-floatmap"),
        ] {
            let Encoded::File { content_type, bytes, .. } = encode(format, false, &map, None) else {
                panic!("{format:?}")
            };
            assert_eq!(content_type, kind);
            assert!(!bytes.is_empty());
        }
    }

    #[test]
    fn padded_size_is_what_counts() {
        assert!(check_padded_size(1, 1, 1000).is_ok(), "tiny images always fit");
        assert!(check_padded_size(1024, 1024, 1 << 20).is_ok());
        let Err(ApiError::PaddedTooLarge { padded_width, padded_height, .. }) = check_padded_size(5000, 1, 1 << 20)
        else {
            panic!("a 5000 x 1 image pads to 5008 x 256 = 1.28 M pixels")
        };
        assert_eq!((padded_width, padded_height), (5008, 256));
    }

    #[test]
    fn server_timing_lists_every_phase() {
        let t = Timings { decode_ms: 1.5, queue_ms: 0.0, inference_ms: 20.25, encode_ms: 3.0, total_ms: 25.0 };
        assert_eq!(t.server_timing(), "decode;dur=1.5, queue;dur=0, inference;dur=20.25, encode;dur=3, total;dur=25");
    }
}
