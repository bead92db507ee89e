//! `POST /api/v1/disparity`: a stereo pair in, a disparity map out.
//!
//! The handler is a list of steps: read the query, refuse at once when the
//! queue is full, read the upload, prepare the inputs (decode, size checks,
//! rectification, ground truth) on the blocking pool, infer on the engine
//! thread, then encode the answer on the blocking pool ([`super::answer`]).

use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use serde::Deserialize;

use super::answer::{
    encode_answer, Answer, AnswerContext, EncodedAnswer, JsonSummary, OutputFormat, Reconstruction, Timings,
};
use super::error::{ApiError, ErrorAnswer};
use super::guard::{decoded_pair_bytes, UploadBudget};
use super::upload::{read_pair, UploadedPair};
use super::{AppState, RequestStart};
use crate::calibration::{self, Calibration, CalibrationError, CalibrationFormat};
use crate::decode::{decode_pair, probe_pair};
use crate::disparity::DisparityMap;
use crate::engine::{ModelInfo, Prediction, StereoPair};
use crate::eval::decode_ground_truth;
use crate::preprocess::PadRule;
use crate::rectify::rectify_pair;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OutputParams {
    /// What to answer: `json` (statistics, timings and the images in base64),
    /// `png16` (KITTI 16-bit PNG), `color` (turbo PNG), `pfm` (float32 PFM),
    /// `uncertainty` (the disparity's standard deviation, float32 PFM, px), or
    /// with a calibration `depth` (PFM), `depth16` (PNG, mm), `ply` (point cloud)
    /// or `depth_uncertainty` (the depth's standard deviation, PFM).
    #[serde(default)]
    format: OutputFormat,
    /// With `format=json`, also include the float PFM (base64); the page uses it
    /// to show the exact value under the cursor.
    #[serde(default)]
    include_pfm: bool,
    /// Scale of an 8-bit ground-truth PNG (disparity = value / scale).
    #[param(exclusive_minimum = 0.0)]
    gt_scale: Option<f32>,
    /// With a calibration: leave out points farther than this (calibration units).
    #[param(exclusive_minimum = 0.0)]
    max_depth: Option<f64>,
    /// Give no value to every pixel whose disparity's standard deviation is
    /// above this many pixels: 0 in `png16`, +inf in `pfm` and `depth`, black in
    /// colour images, 0 in `depth16`, left out of `ply`; the JSON answer says how
    /// many (`uncertainty.masked_pixels`, header `x-masked-pixels` for files).
    /// The deviation outputs themselves keep every pixel.
    #[param(exclusive_minimum = 0.0)]
    max_uncertainty: Option<f32>,
    /// With `format=ply`: each point also carries `sigma_disparity` (px) and
    /// `sigma_depth` (calibration units), its standard deviations.
    #[serde(default)]
    ply_uncertainty: bool,
    /// With `format=json`: `false` leaves out the deviation (`uncertainty`,
    /// `images.uncertainty_*`, `sparsification`), which saves its cost (on a
    /// CPU 7 to 16 % of the inference, and its statistics and image).
    #[serde(default = "yes")]
    #[param(default = true)]
    uncertainty: bool,
}

fn yes() -> bool {
    true
}

impl OutputParams {
    /// Whether the engine must also give the disparity's deviation.
    fn needs_uncertainty(&self) -> bool {
        let in_answer = match self.format {
            OutputFormat::Json => self.uncertainty,
            format => format.carries_uncertainty(),
        };
        in_answer || self.max_uncertainty.is_some() || self.ply_uncertainty
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The disparity map of a stereo pair.
///
/// Send a rectified pair (left and right camera, same size) as
/// `multipart/form-data` fields or as base64 strings in a JSON object, with
/// optionally a ground-truth disparity to score against and a calibration for
/// depth and point clouds. Disparity is in pixels of the left image: the point
/// at (x, y) appears at (x - d, y) on the right.
#[utoipa::path(
    post,
    path = "/api/v1/disparity",
    tag = "disparity",
    params(OutputParams),
    request_body(
        description = "The stereo pair, with optional ground truth and calibration.",
        content(
            (super::upload::PairForm = "multipart/form-data"),
            (super::upload::PairJson = "application/json"),
        ),
    ),
    responses(
        (
            status = 200,
            description = "The answer in the asked format. Files come with `Content-Disposition`; depth answers say their units in `x-depth-units`; with `max_uncertainty`, `x-masked-pixels` says how many pixels were given no value.",
            headers(
                ("server-timing" = String, description = "decode, queue, inference, encode and total time, ms"),
                ("x-request-id" = String, description = "the request's ID"),
            ),
            content(
                (super::answer::DisparityAnswer = "application/json"),
                (super::BinaryFile = "image/png"),
                (super::BinaryFile = "application/x-portable-floatmap"),
                (super::BinaryFile = "application/octet-stream"),
            ),
        ),
        (status = 400, description = "A malformed upload, image, ground truth, calibration or query (see `error.code`).", body = ErrorAnswer),
        (status = 403, description = "`cross_origin_forbidden`: a browser page of another origin.", body = ErrorAnswer),
        (status = 408, description = "`upload_timeout`: the body took too long.", body = ErrorAnswer),
        (status = 413, description = "`body_too_large` or `too_many_pixels`.", body = ErrorAnswer),
        (status = 415, description = "`unsupported_media_type` or `unsupported_image_format`.", body = ErrorAnswer),
        (status = 500, description = "`inference_failed` or `internal_error` (logged on the server).", body = ErrorAnswer),
        (status = 501, description = "`unsupported_transfer_coding`.", body = ErrorAnswer),
        (
            status = 503,
            description = "Busy or not ready: `queue_full`, `upload_budget_full`, `model_loading`, `out_of_memory`, `engine_unavailable`, `too_many_connections`.",
            headers(("retry-after" = u64, description = "seconds to wait before retrying (not for engine_unavailable)")),
            body = ErrorAnswer,
        ),
    )
)]
pub async fn disparity(
    State(state): State<AppState>,
    Extension(RequestStart(started)): Extension<RequestStart>,
    query: Result<Query<OutputParams>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let params = output_params(query)?;
    // Refusals before the body is read; the connection layer then closes the
    // connection after reading the rest of the body away, so the client reads them.
    let receiving = state.admit_upload(request.headers())?;
    let upload = read_pair(request, state.limits.max_upload_bytes, state.limits.upload_timeout).await?;
    let calibration = upload.calibration.as_deref().map(parse_calibration).transpose()?;
    if let (Some(name), None) = (params.format.needs_calibration(), &calibration) {
        return Err(ApiError::CalibrationRequired(name));
    }

    let decode_started = Instant::now();
    let inputs = prepare_inputs(upload, calibration, &params, state.limits.max_pixels, &state.uploads).await?;
    // The upload's bytes are gone once decoded; the queue bounds the decoded pairs from here.
    drop(receiving);
    let decode = decode_started.elapsed();
    let (width, height) = inputs.pair.dimensions();
    tracing::Span::current().record("size", format!("{width}x{height}"));

    let prediction = if params.needs_uncertainty() {
        state.engine.predict_with_uncertainty(inputs.pair).await?
    } else {
        state.engine.predict(inputs.pair).await?
    };
    let info = state.model_info();
    let context = AnswerContext {
        format: params.format,
        include_pfm: params.include_pfm,
        truth: inputs.truth,
        reconstruction: inputs.reconstruction,
        max_uncertainty: params.max_uncertainty,
        ply_uncertainty: params.ply_uncertainty,
    };
    encode_response(context, prediction, info, started, decode).await
}

/// The query, or a 400 that lists what is accepted.
fn output_params(
    query: Result<Query<OutputParams>, axum::extract::rejection::QueryRejection>,
) -> Result<OutputParams, ApiError> {
    let Query(params) = query.map_err(|e| {
        ApiError::InvalidQuery(format!(
            "invalid query ({}); use format=json|png16|color|pfm|uncertainty|depth|depth16|ply|depth_uncertainty, optionally include_pfm=true, gt_scale=N, max_depth=N, max_uncertainty=N, ply_uncertainty=true, uncertainty=false",
            super::error::echo(&e.body_text())
        ))
    })?;
    if let Some(s) = params.gt_scale {
        if !(s.is_finite() && s > 0.0) {
            return Err(ApiError::InvalidQuery(format!(
                "gt_scale={s}: give the positive number an 8-bit ground-truth value is divided by"
            )));
        }
    }
    if let Some(m) = params.max_depth {
        if !(m.is_finite() && m > 0.0) {
            return Err(ApiError::InvalidQuery(format!(
                "max_depth={m}: give a positive distance in the calibration's units"
            )));
        }
    }
    if let Some(s) = params.max_uncertainty {
        if !(s.is_finite() && s > 0.0) {
            return Err(ApiError::InvalidQuery(format!(
                "max_uncertainty={s}: give a positive number of pixels (pixels whose disparity's standard deviation is above it get no value)"
            )));
        }
    }
    if !params.uncertainty && (params.max_uncertainty.is_some() || params.format != OutputFormat::Json) {
        return Err(ApiError::InvalidQuery(
            "uncertainty=false leaves the deviation out of a JSON answer: it goes with format=json and without max_uncertainty".into(),
        ));
    }
    if params.ply_uncertainty && params.format != OutputFormat::Ply {
        return Err(ApiError::InvalidQuery(
            "ply_uncertainty=true adds per-point deviations to a point cloud: use it with format=ply".into(),
        ));
    }
    Ok(params)
}

/// Reads an uploaded calibration file (any supported format).
fn parse_calibration(bytes: &[u8]) -> Result<(Calibration, CalibrationFormat), ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CalibrationError::Syntax {
        format: "calibration",
        message: "the file is not UTF-8 text".into(),
    })?;
    Ok(calibration::parse(text)?)
}

/// The network sees the padded input, so that is what must fit: a 100000 x 1
/// image is small, but padded to 100000 x 256 it is not. The floor of one
/// minimum-size input keeps tiny images (padded to 256 x 256) always allowed.
pub(super) fn check_padded_size(width: u32, height: u32, max_pixels: u64) -> Result<(), ApiError> {
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

/// What inference and encoding need, ready.
struct Inputs {
    pair: StereoPair,
    truth: Option<DisparityMap>,
    reconstruction: Option<Reconstruction>,
}

/// Decodes the pair (and the ground truth beside it), checks sizes, and
/// rectifies when a calibration asks for it: CPU work, on the blocking pool.
async fn prepare_inputs(
    upload: UploadedPair,
    calibration: Option<(Calibration, CalibrationFormat)>,
    params: &OutputParams,
    max_pixels: u64,
    budget: &UploadBudget,
) -> Result<Inputs, ApiError> {
    let (gt_scale, max_depth) = (params.gt_scale, params.max_depth);
    let budget = budget.clone();
    tokio::task::spawn_blocking(move || {
        let UploadedPair { left, right, ground_truth, .. } = upload;
        // Headers first: sizes that disagree, or pixels over the limit, cost no decoding,
        // and the decoded pixels are admitted to the memory budget before they exist.
        let (width, height) = probe_pair(&left, &right, max_pixels)?;
        let _decoding = budget.try_admit(decoded_pair_bytes(width, height)).ok_or_else(|| budget.full())?;
        let (pair, truth) = std::thread::scope(|scope| {
            let truth =
                ground_truth.map(|bytes: Bytes| scope.spawn(move || decode_ground_truth(&bytes, gt_scale, max_pixels)));
            let pair = decode_pair(&left, &right, max_pixels);
            (pair, truth.map(|t| t.join().expect("ground-truth decoding does not panic")))
        });
        let (left, right) = pair?;
        let (width, height) = left.dimensions();
        check_padded_size(width, height, max_pixels)?;
        let truth = truth.transpose()?;
        if let Some(truth) = &truth {
            if (truth.width(), truth.height()) != (width, height) {
                return Err(ApiError::GroundTruthSizeMismatch {
                    truth_width: truth.width(),
                    truth_height: truth.height(),
                    width,
                    height,
                });
            }
        }
        let (pair, reconstruction) = match calibration {
            None => (StereoPair::new(left, right)?, None),
            Some((calibration, format)) => {
                calibration.check_size(width, height)?;
                if truth.is_some() && !calibration.is_rectified() {
                    return Err(ApiError::GroundTruthNeedsRectifiedPair);
                }
                let (left, right, rectification) = rectify_pair(&calibration, left, right)?;
                let colours = left.clone();
                (StereoPair::new(left, right)?, Some(Reconstruction { format, rectification, colours, max_depth }))
            }
        };
        Ok(Inputs { pair, truth, reconstruction })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decode task: {e}")))?
}

/// Encodes the answer on the blocking pool (images, scores and, for JSON, the
/// whole document), then wraps it in a response with its timing headers.
async fn encode_response(
    context: AnswerContext,
    prediction: Prediction,
    info: Option<std::sync::Arc<ModelInfo>>,
    started: Instant,
    decode: Duration,
) -> Result<Response, ApiError> {
    let Prediction { disparity: map, uncertainty: sigma, queue, inference, .. } = prediction;
    let encode_started = Instant::now();
    let (headers, body, timings) = tokio::task::spawn_blocking(move || {
        let Answer {
            body,
            stats,
            uncertainty,
            evaluation,
            sparsification,
            evaluation_kept,
            masked_pixels,
            depth_units,
        } = encode_answer(&context, &map, sigma.as_ref());
        // Taken just before the last few hundred bytes are written.
        let timings = Timings {
            decode_ms: ms(decode),
            queue_ms: ms(queue),
            inference_ms: ms(inference),
            encode_ms: ms(encode_started.elapsed()),
            total_ms: ms(started.elapsed()),
        };
        let (device, model, precision) = match &info {
            Some(i) => (i.device.as_str(), i.name.as_str(), i.precision.as_str()),
            None => ("", "", ""),
        };
        match body {
            EncodedAnswer::Json { partial, reconstruction } => {
                let summary = JsonSummary {
                    width: map.width(),
                    height: map.height(),
                    disparity: stats,
                    device,
                    model,
                    precision,
                    timings_ms: timings,
                    uncertainty,
                    evaluation,
                    sparsification,
                    evaluation_kept,
                    reconstruction: reconstruction.as_deref(),
                };
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (headers, EncodedAnswer::finish_json(partial, &summary), timings)
            }
            EncodedAnswer::File { bytes, content_type, file_name } => {
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                let disposition = format!("inline; filename=\"{file_name}\"");
                headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).expect("ascii"));
                let numbers =
                    [("x-disparity-min", stats.min), ("x-disparity-max", stats.max), ("x-disparity-mean", stats.mean)];
                for (name, value) in numbers {
                    headers.insert(
                        HeaderName::from_static(name),
                        HeaderValue::from_str(&value.to_string()).expect("number"),
                    );
                }
                let device = HeaderValue::from_str(device).unwrap_or(HeaderValue::from_static("unknown"));
                headers.insert(HeaderName::from_static("x-device"), device);
                if let Some(count) = masked_pixels {
                    headers.insert(HeaderName::from_static("x-masked-pixels"), HeaderValue::from(count));
                }
                if let Some(units) = depth_units {
                    headers.insert(HeaderName::from_static("x-depth-units"), HeaderValue::from_static(units));
                }
                if let Some(m) = evaluation {
                    for (name, value) in [("x-eval-epe", m.epe), ("x-eval-d1", m.d1)] {
                        let value = HeaderValue::from_str(&format!("{value:.4}")).expect("number");
                        headers.insert(HeaderName::from_static(name), value);
                    }
                }
                (headers, bytes, timings)
            }
        }
    })
    .await
    .map_err(|e| ApiError::Internal(format!("encode task: {e}")))?;

    let mut response = (headers, body).into_response();
    response.headers_mut().insert(
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
    fn padded_size_is_what_counts() {
        assert!(check_padded_size(1, 1, 1000).is_ok(), "tiny images always fit");
        assert!(check_padded_size(1024, 1024, 1 << 20).is_ok());
        let Err(ApiError::PaddedTooLarge { padded_width, padded_height, .. }) = check_padded_size(5000, 1, 1 << 20)
        else {
            panic!("a 5000 x 1 image pads to 5008 x 256 = 1.28 M pixels")
        };
        assert_eq!((padded_width, padded_height), (5008, 256));
    }
}
