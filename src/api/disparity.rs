//! `POST /api/v1/disparity`: a stereo pair in, a disparity map out.
//!
//! The handler is a list of steps: read the query, refuse at once when the
//! queue is full, read the upload, run the pipeline ([`crate::pipeline`]:
//! decode, infer, encode), and write the answer with its headers.

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::error::{ApiError, ErrorAnswer};
use super::upload::read_pair;
use super::{AppState, RequestStart};
use crate::calibration::{self, Calibration, CalibrationError, CalibrationFormat};
use crate::pipeline::{self, EncodedAnswer, Options, Outcome, OutputFormat, PairInput};

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
    /// Run the network on the pair downscaled by this factor (0.25 to 1): the answer is at
    /// the scaled size, its disparities in pixels of the scaled images (JSON `scale`, header
    /// `x-scale`); about `1 / scale^2` faster. Not with a ground truth.
    #[param(minimum = 0.25, maximum = 1.0)]
    scale: Option<f32>,
}

fn yes() -> bool {
    true
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
                (crate::pipeline::answer::DisparityAnswer = "application/json"),
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
    let format = params.format;
    let request = pipeline::Request {
        pair: PairInput::Files { left: upload.left, right: upload.right },
        ground_truth: upload.ground_truth,
        calibration,
        options: params.into_options(),
        started,
        receiving: Some(receiving),
    };
    let outcome = state.pipeline().run(request).await?;
    Ok(respond(outcome, format))
}

impl OutputParams {
    /// The pipeline's options for this query.
    fn into_options(self) -> Options {
        Options {
            formats: vec![self.format],
            include_pfm: self.include_pfm,
            gt_scale: self.gt_scale,
            max_depth: self.max_depth,
            max_uncertainty: self.max_uncertainty,
            ply_uncertainty: self.ply_uncertainty,
            // A JSON answer carries the deviation unless told not to; files that carry it need it anyway.
            uncertainty: self.format == OutputFormat::Json && self.uncertainty,
            scale: self.scale,
        }
    }
}

/// The query, or a 400 that lists what is accepted.
fn output_params(
    query: Result<Query<OutputParams>, axum::extract::rejection::QueryRejection>,
) -> Result<OutputParams, ApiError> {
    let Query(params) = query.map_err(|e| {
        ApiError::InvalidQuery(format!(
            "invalid query ({}); use format={}, optionally include_pfm=true, gt_scale=N, max_depth=N, max_uncertainty=N, ply_uncertainty=true, uncertainty=false, scale=F",
            super::error::echo(&e.body_text()),
            OutputFormat::choices(),
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
    if let Some(problem) = params.scale.and_then(pipeline::scale_problem) {
        return Err(ApiError::InvalidQuery(problem));
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

/// The outcome as an HTTP answer: the JSON document, or the file with its
/// figures in headers, and the phase timings in `Server-Timing`.
fn respond(outcome: Outcome, format: OutputFormat) -> Response {
    let timings = outcome.timings;
    let device = outcome.model.as_ref().map_or("", |m| m.device.as_str());
    let mut headers = HeaderMap::new();
    if let Some(scale) = outcome.scale {
        headers.insert(super::headers::SCALE, HeaderValue::from_str(&scale.to_string()).expect("a number is ASCII"));
    }
    let answer = outcome.answers.into_iter().find(|(f, _)| *f == format).map(|(_, a)| a);
    let answer = answer.expect("the pipeline answers the one format asked");
    if matches!(answer.body, EncodedAnswer::File { .. }) {
        super::headers::file_figures(&mut headers, &answer, device);
    }
    let body = match answer.body {
        EncodedAnswer::Document(bytes) => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            bytes
        }
        EncodedAnswer::File { bytes, content_type, file_name } => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            let disposition = format!("inline; filename=\"{file_name}\"");
            headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).expect("ascii"));
            bytes
        }
        EncodedAnswer::Json { .. } => unreachable!("the pipeline finishes JSON answers"),
    };
    let mut response = (headers, body).into_response();
    response.headers_mut().insert(super::headers::SERVER_TIMING, super::headers::server_timing(&timings));
    response.extensions_mut().insert(timings);
    response
}
