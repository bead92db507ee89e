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
use crate::calibration::{self, Calibration, CalibrationError, CalibrationFormat};
use crate::codec::{colormap, kitti, pfm, png_bytes};
use crate::decode::decode_rgb;
use crate::disparity::{DisparityMap, DisparityStats};
use crate::engine::StereoPair;
use crate::eval::{decode_ground_truth, error_map, evaluate, Metrics};
use crate::geometry::{self, Mat3};
use crate::preprocess::PadRule;
use crate::reconstruct::{depth_map, encode_ply, DepthStats};
use crate::rectify::{rectify_pair, Rectification, StereoCamera};

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
    /// Depth as float32 PFM in the calibration's units (+inf = none); needs a calibration.
    Depth,
    /// Depth as a 16-bit PNG in millimetres (0 = none); needs a calibration.
    Depth16,
    /// Coloured point cloud, binary PLY, left camera frame; needs a calibration.
    Ply,
}

impl OutputFormat {
    fn needs_calibration(self) -> Option<&'static str> {
        match self {
            OutputFormat::Depth => Some("depth"),
            OutputFormat::Depth16 => Some("depth16"),
            OutputFormat::Ply => Some("ply"),
            _ => None,
        }
    }
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
    /// With a calibration: leave out points farther than this (calibration units).
    max_depth: Option<f64>,
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
    /// With a calibration: depth in colour (near red, far blue).
    #[serde(skip_serializing_if = "Option::is_none")]
    depth_color_png: Option<String>,
    /// With a calibration and `include_pfm=true`: depth, float32 PFM, calibration units.
    #[serde(skip_serializing_if = "Option::is_none")]
    depth_pfm: Option<String>,
    /// When the server rectified the pair: the rectified left image the maps refer to.
    #[serde(skip_serializing_if = "Option::is_none")]
    rectified_left_png: Option<String>,
}

/// The 3-D part of a JSON answer.
#[derive(Serialize)]
struct ReconstructionSummary {
    calibration_format: CalibrationFormat,
    /// Whether the server resampled the images onto rectified cameras (the
    /// disparity and depth maps then refer to the rectified left image).
    rectified: bool,
    /// The rectified left camera that depth and points are computed with.
    camera: StereoCamera,
    /// OpenCV's disparity-to-depth matrix.
    q: [[f64; 4]; 4],
    #[serde(skip_serializing_if = "Option::is_none")]
    rectification: Option<RectificationSummary>,
    depth: DepthStats,
}

#[derive(Serialize)]
struct RectificationSummary {
    r_left: Mat3,
    r_right: Mat3,
    p_left: [[f64; 4]; 3],
    p_right: [[f64; 4]; 3],
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
    /// Depth and camera, when a calibration was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    reconstruction: Option<Box<ReconstructionSummary>>,
    images: Images,
}

/// What a calibration brings to a request: the rectification applied (or not)
/// and the left image the maps refer to, for colours.
struct Reconstruction {
    format: CalibrationFormat,
    rectification: Rectification,
    colours: image::Rgb32FImage,
    max_depth: Option<f64>,
}

/// Depth products of one prediction, before base64.
struct DepthProducts {
    summary: ReconstructionSummary,
    color_png: Vec<u8>,
    pfm: Option<Vec<u8>>,
    rectified_left_png: Option<Vec<u8>>,
}

/// The encoded answer, before the total time is known.
enum Encoded {
    Json {
        color_png: Vec<u8>,
        kitti_png16: Vec<u8>,
        pfm: Option<Vec<u8>>,
        error_png: Option<Vec<u8>>,
        depth: Option<Box<DepthProducts>>,
    },
    File {
        bytes: Vec<u8>,
        content_type: &'static str,
        file_name: &'static str,
    },
}

/// The answer ready to send: JSON images already in base64.
enum Answer {
    Json(Images, Option<Box<ReconstructionSummary>>),
    File { bytes: Vec<u8>, content_type: &'static str, file_name: &'static str },
}

impl From<Encoded> for Answer {
    fn from(encoded: Encoded) -> Answer {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        match encoded {
            Encoded::Json { color_png, kitti_png16, pfm, error_png, depth } => {
                let (summary, depth_color_png, depth_pfm, rectified_left_png) = match depth {
                    Some(d) => (
                        Some(Box::new(d.summary)),
                        Some(b64(&d.color_png)),
                        d.pfm.as_deref().map(b64),
                        d.rectified_left_png.as_deref().map(b64),
                    ),
                    None => (None, None, None, None),
                };
                Answer::Json(
                    Images {
                        color_png: b64(&color_png),
                        kitti_png16: b64(&kitti_png16),
                        pfm: pfm.as_deref().map(b64),
                        error_png: error_png.as_deref().map(b64),
                        depth_color_png,
                        depth_pfm,
                        rectified_left_png,
                    },
                    summary,
                )
            }
            Encoded::File { bytes, content_type, file_name } => Answer::File { bytes, content_type, file_name },
        }
    }
}

fn encode(
    format: OutputFormat,
    include_pfm: bool,
    map: &DisparityMap,
    truth: Option<&DisparityMap>,
    reconstruction: Option<&Reconstruction>,
) -> Encoded {
    // Depth only for the answers that carry it, not for a raw disparity file.
    let wants_depth =
        matches!(format, OutputFormat::Json | OutputFormat::Depth | OutputFormat::Depth16 | OutputFormat::Ply);
    let depth = reconstruction.filter(|_| wants_depth).map(|r| depth_map(map, &r.rectification.camera, r.max_depth));
    match format {
        OutputFormat::Json => {
            // The two PNGs are the bulk of the encoding time (about 25 ms for a KITTI-sized
            // map, more than half a GPU inference): encode them side by side.
            let (color_png, kitti_png16) = std::thread::scope(|scope| {
                let color = scope.spawn(|| colormap::color_png(map));
                let png16 = kitti::encode_png16(map);
                (color.join().expect("colour PNG encoding does not panic"), png16)
            });
            encode_json(color_png, kitti_png16, include_pfm, map, truth, reconstruction, depth.as_ref())
        }
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
        // The handler refuses these formats without a calibration before inference.
        OutputFormat::Depth => Encoded::File {
            bytes: depth.as_ref().expect("calibration checked").to_pfm(),
            content_type: "application/x-portable-floatmap",
            file_name: "depth.pfm",
        },
        OutputFormat::Depth16 => Encoded::File {
            bytes: depth.as_ref().expect("calibration checked").to_png16_mm(),
            content_type: "image/png",
            file_name: "depth_mm.png",
        },
        OutputFormat::Ply => {
            let r = reconstruction.expect("calibration checked");
            let to_left = geometry::transpose(&r.rectification.r_left);
            let points = depth.as_ref().expect("calibration checked").point_cloud(&r.colours, &to_left);
            Encoded::File {
                bytes: encode_ply(&points, r.rectification.camera.units.symbol()),
                content_type: "application/octet-stream",
                file_name: "points.ply",
            }
        }
    }
}

/// The JSON answer's files, around the two PNGs already encoded.
fn encode_json(
    color_png: Vec<u8>,
    kitti_png16: Vec<u8>,
    include_pfm: bool,
    map: &DisparityMap,
    truth: Option<&DisparityMap>,
    reconstruction: Option<&Reconstruction>,
    depth: Option<&crate::reconstruct::DepthMap>,
) -> Encoded {
    Encoded::Json {
        color_png,
        kitti_png16,
        pfm: include_pfm.then(|| pfm::encode(map)),
        error_png: truth.map(|truth| {
            let errors = error_map(map, truth);
            crate::codec::png_bytes(errors.as_raw(), map.width(), map.height(), image::ExtendedColorType::Rgb8)
        }),
        depth: reconstruction.zip(depth).map(|(r, depth)| {
            let rect = &r.rectification;
            Box::new(DepthProducts {
                summary: ReconstructionSummary {
                    calibration_format: r.format,
                    rectified: rect.applied,
                    camera: rect.camera,
                    q: rect.q,
                    rectification: rect.applied.then_some(RectificationSummary {
                        r_left: rect.r_left,
                        r_right: rect.r_right,
                        p_left: rect.p_left,
                        p_right: rect.p_right,
                    }),
                    depth: depth.stats(r.max_depth),
                },
                color_png: depth.to_color_png(),
                pfm: include_pfm.then(|| depth.to_pfm()),
                rectified_left_png: rect.applied.then(|| {
                    let rgb = image::DynamicImage::ImageRgb32F(r.colours.clone()).into_rgb8();
                    png_bytes(rgb.as_raw(), rgb.width(), rgb.height(), image::ExtendedColorType::Rgb8)
                }),
            })
        }),
    }
}

/// Reads an uploaded calibration file (any supported format).
fn parse_calibration(bytes: &[u8]) -> Result<(Calibration, CalibrationFormat), ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CalibrationError::Syntax {
        format: "calibration",
        message: "the file is not UTF-8 text".into(),
    })?;
    Ok(calibration::parse(text)?)
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
            "invalid query ({}); use format=json|png16|color|pfm|depth|depth16|ply, optionally include_pfm=true, gt_scale=N, max_depth=N",
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
    if let Some(m) = params.max_depth {
        if !(m.is_finite() && m > 0.0) {
            return Err(ApiError::InvalidQuery(format!(
                "max_depth={m}: give a positive distance in the calibration's units"
            )));
        }
    }
    let upload = read_pair(request, state.limits.max_upload_bytes, state.limits.upload_timeout).await?;
    let calibration = upload.calibration.as_deref().map(parse_calibration).transpose()?;
    if let (Some(name), None) = (params.format.needs_calibration(), &calibration) {
        return Err(ApiError::CalibrationRequired(name));
    }

    let decode_started = Instant::now();
    let max_pixels = state.limits.max_pixels;
    let truth = upload.ground_truth.map(|bytes| {
        let scale = params.gt_scale;
        tokio::task::spawn_blocking(move || decode_ground_truth(&bytes, scale, max_pixels))
    });
    let pair = decode_pair(upload.left, upload.right, max_pixels).await?;
    let (width, height) = pair.dimensions();
    check_padded_size(width, height, max_pixels)?;
    let (pair, reconstruction) = match calibration {
        None => (pair, None),
        Some((calibration, format)) => {
            calibration.check_size(width, height)?;
            if truth.is_some() && !calibration.is_rectified() {
                return Err(ApiError::GroundTruthNeedsRectifiedPair);
            }
            let max_depth = params.max_depth;
            // Resampling two images is CPU work: the blocking pool, not an async worker.
            tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
                let (left, right) = pair.into_images();
                let (left, right, rectification) = rectify_pair(&calibration, left, right)?;
                let colours = left.clone();
                let pair = StereoPair::new(left, right)?;
                Ok((pair, Some(Reconstruction { format, rectification, colours, max_depth })))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("rectify task: {e}")))??
        }
    };
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
    let (answer, stats, evaluation, depth_units) = tokio::task::spawn_blocking(move || {
        let evaluation = truth.as_ref().map(|truth| evaluate(&map, truth, crate::eval::DEFAULT_MAXDISP));
        let encoded = encode(format, include_pfm, &map, truth.as_ref(), reconstruction.as_ref());
        let units = reconstruction.as_ref().map(|r| r.rectification.camera.units.symbol());
        (Answer::from(encoded), map.stats(), evaluation, units)
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
        Answer::Json(images, reconstruction) => Json(DisparityResponse {
            width,
            height,
            disparity: stats,
            device,
            model,
            timings_ms: timings,
            evaluation,
            reconstruction,
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
            if let Some(units) = depth_units {
                headers.insert(HeaderName::from_static("x-depth-units"), HeaderValue::from_static(units));
            }
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
        match encode(OutputFormat::Json, true, &map, Some(&map), None) {
            Encoded::Json { color_png, kitti_png16, pfm, error_png, depth: None } => {
                assert!(color_png.starts_with(b"\x89PNG") && kitti_png16.starts_with(b"\x89PNG"));
                assert!(pfm.unwrap().starts_with(b"Pf\n2 2\n"));
                assert!(error_png.unwrap().starts_with(b"\x89PNG"));
            }
            _ => panic!("json must not be a file, nor have depth without a calibration"),
        }
        let Encoded::Json { pfm: None, error_png: None, .. } = encode(OutputFormat::Json, false, &map, None, None)
        else {
            panic!("pfm is opt-in, the error map needs ground truth")
        };
        for (format, kind) in [
            (OutputFormat::Png16, "image/png"),
            (OutputFormat::Color, "image/png"),
            (OutputFormat::Pfm, "application/x-portable-floatmap"),
        ] {
            let Encoded::File { content_type, bytes, .. } = encode(format, false, &map, None, None) else {
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
