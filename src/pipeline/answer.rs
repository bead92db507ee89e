//! Turning a disparity map into the bytes of the answer the client asked for.
//!
//! This is the CPU work after inference (the "encode" phase of `Server-Timing`):
//! PNGs, PFMs, PLYs, scores and, for `format=json`, one JSON document carrying
//! the images in base64. It is synchronous and pure (no HTTP types), so the
//! pipeline runs it on the CPU pool and the request bench
//! (`tests/bench/request.rs`) times exactly the server's code.
//!
//! Speed decisions, measured with `make bench-request` (docs/performance.md):
//! - The images of one JSON answer are encoded side by side on the CPU pool,
//!   each straight to base64, and the JSON document is written once into one
//!   buffer: no base64 `String`s, no serde pass over megabytes of text.
//! - The `images` object comes first in the document, so the small fields after
//!   it (with the timings, known only at the end) are appended, not inserted.

use base64::Engine as _;
use serde::Serialize;

use super::format::OutputFormat;
use crate::calibration::CalibrationFormat;
use crate::codec::{colormap, kitti, pfm, png_bytes};
use crate::disparity::{DisparityMap, DisparityStats};
use crate::eval::{error_map, evaluate, Metrics, ScoredPixels, Sparsification, DEFAULT_MAXDISP};
use crate::geometry::{self, Mat3};
use crate::reconstruct::{depth_map, encode_ply_with_uncertainty, DepthMap, DepthStats};
use crate::rectify::{Rectification, StereoCamera};
use crate::uncertainty::{self, UncertaintyStats};

/// `d` in milliseconds, to a tenth (what every timing reports).
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Where the time of one request went, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Timings {
    pub decode_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub encode_ms: f64,
    pub total_ms: f64,
}

impl Timings {
    /// Adds a front end's own encoding after the pipeline's, with the new total.
    pub fn add_encode(&mut self, encode: std::time::Duration, total: std::time::Duration) {
        self.encode_ms = ((self.encode_ms + ms(encode)) * 10.0).round() / 10.0;
        self.total_ms = ms(total);
    }

    /// As a `Server-Timing` header, which browsers' developer tools display.
    pub fn server_timing(&self) -> String {
        format!(
            "decode;dur={}, queue;dur={}, inference;dur={}, encode;dur={}, total;dur={}",
            self.decode_ms, self.queue_ms, self.inference_ms, self.encode_ms, self.total_ms
        )
    }
}

/// What a calibration brings to a request: the rectification applied (or not)
/// and the left image the maps refer to, for colours.
pub struct Reconstruction {
    pub format: CalibrationFormat,
    pub rectification: Rectification,
    pub colours: image::Rgb32FImage,
    pub max_depth: Option<f64>,
}

/// Everything besides the map that decides the answer's bytes.
pub struct AnswerContext<'a> {
    pub format: OutputFormat,
    /// With `format=json`, also include the float PFM(s) in base64.
    pub include_pfm: bool,
    /// Ground truth to score against and draw the error map of.
    pub truth: Option<&'a DisparityMap>,
    pub reconstruction: Option<&'a Reconstruction>,
    /// Pixels whose deviation is above this (px) get no value in every
    /// disparity, depth and point output (the deviation outputs keep theirs).
    pub max_uncertainty: Option<f32>,
    /// With `format=ply`, each point also carries its deviations.
    pub ply_uncertainty: bool,
}

/// How far to trust the answer: the disparity's standard deviation over every
/// pixel (before any masking), and what `max_uncertainty` hid.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct UncertaintySummary {
    /// Mean standard deviation, px.
    pub mean: f32,
    pub median: f32,
    /// 90th percentile, px.
    pub p90: f32,
    /// `images.uncertainty_png` runs the turbo colours from 0 px (dark blue) to
    /// this (dark red; larger values are drawn as it): the 99th percentile.
    pub color_max: f32,
    /// The `max_uncertainty` asked for, px.
    pub max_uncertainty: Option<f32>,
    /// Pixels whose deviation is above `max_uncertainty`, given no value in the
    /// disparity, depth and point outputs (0 without a limit).
    pub masked_pixels: u64,
}

/// The 3-D part of a JSON answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ReconstructionSummary {
    calibration_format: CalibrationFormat,
    /// Whether the server resampled the images onto rectified cameras (the
    /// disparity and depth maps then refer to the rectified left image).
    rectified: bool,
    /// The rectified left camera that depth and points are computed with.
    camera: StereoCamera,
    /// OpenCV's disparity-to-depth matrix.
    #[schema(value_type = Vec<Vec<f64>>)]
    q: [[f64; 4]; 4],
    #[serde(skip_serializing_if = "Option::is_none")]
    rectification: Option<RectificationSummary>,
    depth: DepthStats,
    /// Standard deviation of the depth (`Z^2 / (f B) * sigma`) over the pixels
    /// with a depth, in the calibration's units.
    #[serde(skip_serializing_if = "Option::is_none")]
    depth_uncertainty: Option<UncertaintyStats>,
}

/// The rectification the server applied (OpenCV's R1, R2, P1, P2).
#[derive(Serialize, utoipa::ToSchema)]
struct RectificationSummary {
    #[schema(value_type = Vec<Vec<f64>>)]
    r_left: Mat3,
    #[schema(value_type = Vec<Vec<f64>>)]
    r_right: Mat3,
    #[schema(value_type = Vec<Vec<f64>>)]
    p_left: [[f64; 4]; 3],
    #[schema(value_type = Vec<Vec<f64>>)]
    p_right: [[f64; 4]; 3],
}

/// The JSON answer's fields besides `images` (which is written before them).
#[derive(Serialize, utoipa::ToSchema)]
pub struct JsonSummary<'a> {
    /// The maps' size: the pair's, or with `scale` the scaled pair's.
    pub width: u32,
    pub height: u32,
    /// With `scale` below 1: the factor the pair was downscaled by; disparities are in
    /// pixels of the scaled images (divide by it for the original's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    pub disparity: DisparityStats,
    pub device: &'a str,
    pub model: &'a str,
    pub precision: &'a str,
    pub timings_ms: Timings,
    /// The disparity's standard deviation, and what `max_uncertainty` masked
    /// (left out with `uncertainty=false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<UncertaintySummary>,
    /// Scores of the network's whole answer against the uploaded ground truth,
    /// if any (masking does not hide errors from it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Metrics>,
    /// With a ground truth: the scores over the most certain 100/90/80/50 % of
    /// the scored pixels, and how well the deviation ranks the errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsification: Option<Sparsification>,
    /// With a ground truth and `max_uncertainty`: the scores over the pixels kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation_kept: Option<Metrics>,
    /// Depth and camera, when a calibration was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ReconstructionSummary>)]
    pub reconstruction: Option<&'a ReconstructionSummary>,
}

/// The answer of `format=json`. Written in two parts for speed (the images by
/// [`encode_answer`], the rest by [`EncodedAnswer::finish_json`]); this type
/// describes the whole document for the OpenAPI schema.
#[derive(Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // never built: the document is written in parts
pub struct DisparityAnswer<'a> {
    pub images: AnswerImages,
    #[serde(flatten)]
    pub summary: JsonSummary<'a>,
}

/// The files of a JSON answer, base64-encoded (standard alphabet, padded).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // describes what `encode_json` writes
pub struct AnswerImages {
    /// The disparity in colour (turbo, from the map's min to its max; black = no value).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub color_png: String,
    /// KITTI 16-bit PNG: `round(d * 256)`, 0 = no value.
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub kitti_png16: String,
    /// float32 PFM of the disparity (with `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub pfm: Option<String>,
    /// The disparity's standard deviation in colour (255 turbo levels, 0 px to
    /// `uncertainty.color_max`); left out with `uncertainty=false`.
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub uncertainty_png: Option<String>,
    /// float32 PFM of the disparity's standard deviation, px (with `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub uncertainty_pfm: Option<String>,
    /// Error against the ground truth, coloured (with a ground truth).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub error_png: Option<String>,
    /// Depth in colour (with a calibration).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub depth_color_png: Option<String>,
    /// float32 PFM of the depth, calibration units, +inf = none (with a calibration and `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub depth_pfm: Option<String>,
    /// float32 PFM of the depth's standard deviation, calibration units, +inf = no depth
    /// (with a calibration and `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub depth_uncertainty_pfm: Option<String>,
    /// The left image after rectification, which the maps refer to (when the server rectified).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub rectified_left_png: Option<String>,
}

/// An answer with its bytes made.
pub enum EncodedAnswer {
    /// `{"images":{...}` written, the total time not yet known;
    /// [`EncodedAnswer::finish_json`] closes it.
    Json {
        partial: Vec<u8>,
        reconstruction: Option<Box<ReconstructionSummary>>,
    },
    /// A finished JSON answer.
    Document(Vec<u8>),
    File {
        bytes: Vec<u8>,
        content_type: &'static str,
        file_name: &'static str,
    },
}

/// An encoded answer with what the handler reports beside it.
pub struct Answer {
    pub body: EncodedAnswer,
    pub stats: DisparityStats,
    pub uncertainty: Option<UncertaintySummary>,
    pub evaluation: Option<Metrics>,
    pub sparsification: Option<Sparsification>,
    pub evaluation_kept: Option<Metrics>,
    /// Pixels `max_uncertainty` masked (`x-masked-pixels`), when it was given.
    pub masked_pixels: Option<u64>,
    /// Units of depth outputs (`x-depth-units`), when a calibration was sent.
    pub depth_units: Option<&'static str>,
    /// The depth map's figures, when the format made one.
    pub depth: Option<DepthStats>,
    /// Points written, for `ply`.
    pub points: Option<usize>,
}

impl EncodedAnswer {
    /// Appends the summary fields and closes the JSON document.
    pub fn finish_json(mut partial: Vec<u8>, summary: &JsonSummary) -> Vec<u8> {
        let fields = serde_json::to_vec(summary).expect("the summary serialises");
        // `fields` is a non-empty object `{...}`: continue ours with its members.
        partial.push(b',');
        partial.extend_from_slice(&fields[1..]);
        partial
    }
}

/// Encodes the answer for `map` (with its deviation `sigma`, when inference
/// gave one) as `context` asks. The server's encode phase.
///
/// The handler asks the engine for the deviation whenever the answer needs it
/// ([`OutputFormat::carries_uncertainty`], `max_uncertainty`, `ply_uncertainty`).
pub fn encode_answer(context: &AnswerContext, map: &DisparityMap, sigma: Option<&DisparityMap>) -> Answer {
    let (truth, reconstruction) = (context.truth, context.reconstruction);
    // What the client sees: the map with the too-uncertain pixels given no value.
    let limit = sigma.zip(context.max_uncertainty);
    let masked = limit.map(|(sigma, max)| uncertainty::mask(map, sigma, max));
    let shown = masked.as_ref().map_or(map, |(m, _)| m);
    let depth = reconstruction.filter(|_| context.format.carries_depth()).map(|r| {
        let mut depth = depth_map(shown, &r.rectification.camera, r.max_depth);
        if let Some((sigma, max)) = limit {
            depth.mark_uncertain(sigma, max);
        }
        depth
    });
    // One pass over the map for its statistics, shared with the colour PNG's range.
    let stats = shown.stats();
    let summary = sigma.filter(|_| context.format == OutputFormat::Json).map(|sigma| {
        let (s, p99) = uncertainty::stats_and_p99(sigma);
        UncertaintySummary {
            mean: s.mean,
            median: s.median,
            p90: s.p90,
            color_max: p99,
            max_uncertainty: context.max_uncertainty,
            masked_pixels: masked.as_ref().map_or(0, |(_, n)| *n),
        }
    });
    let file = |bytes, content_type, file_name| EncodedAnswer::File { bytes, content_type, file_name };
    let mut points_written = None;
    let pfm_type = "application/x-portable-floatmap";
    // The handler refuses formats that need a calibration without one, and asks
    // the engine for the deviation when the format needs it, before inference.
    let needs_depth = || depth.as_ref().expect("calibration checked");
    let needs_sigma = || sigma.expect("deviation asked for");
    let body = match context.format {
        OutputFormat::Json => encode_json(
            &JsonParts { shown, map, stats: &stats, sigma, uncertainty: summary.as_ref(), depth: depth.as_ref() },
            context.include_pfm,
            truth,
            reconstruction,
        ),
        OutputFormat::Png16 => file(kitti::encode_png16(shown), "image/png", "disparity_kitti16.png"),
        OutputFormat::Color => {
            file(colormap::color_png_between(shown, stats.min, stats.max), "image/png", "disparity_color.png")
        }
        OutputFormat::Pfm => file(pfm::encode(shown), pfm_type, "disparity.pfm"),
        OutputFormat::Uncertainty => file(pfm::encode(needs_sigma()), pfm_type, "uncertainty.pfm"),
        OutputFormat::Depth => file(needs_depth().to_pfm(), pfm_type, "depth.pfm"),
        OutputFormat::Depth16 => file(needs_depth().to_png16_mm(), "image/png", "depth_mm.png"),
        OutputFormat::DepthUncertainty => {
            let depth = needs_depth();
            let values = depth.uncertainty(needs_sigma());
            file(pfm::encode_values(depth.width, depth.height, &values), pfm_type, "depth_uncertainty.pfm")
        }
        OutputFormat::Ply => {
            let r = reconstruction.expect("calibration checked");
            let to_left = geometry::transpose(&r.rectification.r_left);
            let depth = needs_depth();
            let points = depth.point_cloud(&r.colours, &to_left);
            points_written = Some(points.len());
            let per_point = context.ply_uncertainty.then(|| depth.point_uncertainties(needs_sigma()));
            let units = r.rectification.camera.units.symbol();
            file(
                encode_ply_with_uncertainty(&points, per_point.as_deref(), units),
                "application/octet-stream",
                "points.ply",
            )
        }
    };
    let json = context.format == OutputFormat::Json;
    Answer {
        body,
        stats,
        uncertainty: summary,
        evaluation: truth.map(|truth| evaluate(map, truth, DEFAULT_MAXDISP)),
        sparsification: truth.zip(sigma).filter(|_| json).and_then(|(truth, sigma)| {
            let mut scored = ScoredPixels::default();
            scored.add(map, sigma, truth, DEFAULT_MAXDISP);
            scored.sparsification()
        }),
        evaluation_kept: truth.zip(masked.as_ref()).map(|(truth, (kept, _))| evaluate_kept(kept, truth)),
        masked_pixels: masked.as_ref().map(|(_, n)| *n),
        depth_units: reconstruction.map(|r| r.rectification.camera.units.symbol()),
        depth: depth.as_ref().zip(reconstruction).map(|(d, r)| d.stats(r.max_depth)),
        points: points_written,
    }
}

/// Scores of `kept` (a masked map: no value = +inf) over its pixels with a value.
fn evaluate_kept(kept: &DisparityMap, truth: &DisparityMap) -> Metrics {
    // Taking the truth away where the answer has none scores just the rest.
    let values = kept.values().iter().zip(truth.values()).map(|(k, &t)| if k.is_finite() { t } else { f32::INFINITY });
    let truth = DisparityMap::new(truth.width(), truth.height(), values.collect()).expect("same size");
    evaluate(kept, &truth, DEFAULT_MAXDISP)
}

/// One image of the JSON answer: its key and how to make its file.
type ImageJob<'a> = (&'static str, Box<dyn FnOnce() -> Vec<u8> + Send + 'a>);

/// The maps and figures a JSON answer's images are made from.
struct JsonParts<'a> {
    /// The disparity as the client sees it (masked by `max_uncertainty`).
    shown: &'a DisparityMap,
    /// The network's whole answer, for the error map.
    map: &'a DisparityMap,
    stats: &'a DisparityStats,
    sigma: Option<&'a DisparityMap>,
    uncertainty: Option<&'a UncertaintySummary>,
    depth: Option<&'a DepthMap>,
}

/// The JSON answer up to and including its `images` object.
fn encode_json(
    parts: &JsonParts,
    include_pfm: bool,
    truth: Option<&DisparityMap>,
    reconstruction: Option<&Reconstruction>,
) -> EncodedAnswer {
    let JsonParts { shown, map, stats, sigma, uncertainty, depth } = *parts;
    let mut jobs: Vec<ImageJob> = vec![
        ("color_png", Box::new(move || colormap::color_png_between(shown, stats.min, stats.max))),
        ("kitti_png16", Box::new(move || kitti::encode_png16(shown))),
    ];
    if include_pfm {
        jobs.push(("pfm", Box::new(move || pfm::encode(shown))));
    }
    if let (Some(sigma), Some(summary)) = (sigma, uncertainty) {
        let top = summary.color_max;
        jobs.push(("uncertainty_png", Box::new(move || colormap::palette_png_between(sigma, 0.0, top))));
        if include_pfm {
            jobs.push(("uncertainty_pfm", Box::new(move || pfm::encode(sigma))));
        }
    }
    if let Some(truth) = truth {
        jobs.push((
            "error_png",
            Box::new(move || {
                let errors = error_map(map, truth);
                png_bytes(errors.as_raw(), map.width(), map.height(), crate::codec::PixelKind::Rgb8)
            }),
        ));
    }
    let mut summary = None;
    if let (Some(r), Some(depth)) = (reconstruction, depth) {
        let rect = &r.rectification;
        let depth_sigma = sigma.map(|sigma| depth.uncertainty(sigma));
        summary = Some(Box::new(ReconstructionSummary {
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
            depth_uncertainty: depth_sigma.as_deref().map(uncertainty::stats_of),
        }));
        jobs.push(("depth_color_png", Box::new(move || depth.to_color_png())));
        if include_pfm {
            jobs.push(("depth_pfm", Box::new(move || depth.to_pfm())));
            if let Some(values) = depth_sigma {
                jobs.push((
                    "depth_uncertainty_pfm",
                    Box::new(move || pfm::encode_values(depth.width, depth.height, &values)),
                ));
            }
        }
        if rect.applied {
            jobs.push((
                "rectified_left_png",
                Box::new(|| {
                    let rgb = image::DynamicImage::ImageRgb32F(r.colours.clone()).into_rgb8();
                    png_bytes(rgb.as_raw(), rgb.width(), rgb.height(), crate::codec::PixelKind::Rgb8)
                }),
            ));
        }
    }
    EncodedAnswer::Json { partial: images_object(jobs), reconstruction: summary }
}

/// `{"images":{"key":"<base64>",...}` with every image made and base64-encoded
/// side by side on the CPU pool.
fn images_object(jobs: Vec<ImageJob>) -> Vec<u8> {
    use rayon::prelude::*;
    let encoded: Vec<(&'static str, Vec<u8>)> =
        jobs.into_par_iter().map(|(key, make)| (key, base64_of(&make()))).collect();
    let size: usize = encoded.iter().map(|(key, b64)| key.len() + b64.len() + 6).sum();
    let mut json = Vec::with_capacity(size + 512);
    json.extend_from_slice(b"{\"images\":{");
    for (i, (key, b64)) in encoded.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        // Keys are our own identifiers and base64 needs no JSON escaping.
        json.push(b'"');
        json.extend_from_slice(key.as_bytes());
        json.extend_from_slice(b"\":\"");
        json.extend_from_slice(b64);
        json.push(b'"');
    }
    json.push(b'}');
    json
}

/// Standard base64 of `bytes`, as bytes (ASCII).
fn base64_of(bytes: &[u8]) -> Vec<u8> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut out = vec![0; base64::encoded_len(bytes.len(), true).expect("an in-memory file's base64 fits")];
    let written = engine.encode_slice(bytes, &mut out).expect("the buffer is sized for it");
    out.truncate(written);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(format: OutputFormat, include_pfm: bool, truth: Option<&DisparityMap>) -> AnswerContext<'_> {
        AnswerContext {
            format,
            include_pfm,
            truth,
            reconstruction: None,
            max_uncertainty: None,
            ply_uncertainty: false,
        }
    }

    fn finished(answer: Answer) -> serde_json::Value {
        let EncodedAnswer::Json { partial, reconstruction } = answer.body else { panic!("not JSON") };
        let timings = Timings { decode_ms: 1.0, queue_ms: 0.0, inference_ms: 2.0, encode_ms: 3.0, total_ms: 6.0 };
        let summary = JsonSummary {
            width: 2,
            height: 2,
            scale: None,
            disparity: answer.stats,
            device: "cpu",
            model: "m",
            precision: "fp32",
            timings_ms: timings,
            uncertainty: answer.uncertainty,
            evaluation: answer.evaluation,
            sparsification: answer.sparsification,
            evaluation_kept: answer.evaluation_kept,
            reconstruction: reconstruction.as_deref(),
        };
        serde_json::from_slice(&EncodedAnswer::finish_json(partial, &summary)).expect("valid JSON")
    }

    #[test]
    fn json_answer_is_one_valid_document_with_exact_base64_images() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let sigma = DisparityMap::new(2, 2, vec![0.5, 1.0, 1.5, 2.0]).unwrap();
        let json = finished(encode_answer(&context(OutputFormat::Json, true, Some(&map)), &map, Some(&sigma)));
        let b64 = |key: &str| {
            base64::engine::general_purpose::STANDARD.decode(json["images"][key].as_str().unwrap()).unwrap()
        };
        assert_eq!(b64("color_png"), colormap::color_png(&map));
        assert_eq!(b64("kitti_png16"), kitti::encode_png16(&map));
        assert_eq!(b64("pfm"), pfm::encode(&map));
        assert_eq!(b64("uncertainty_pfm"), pfm::encode(&sigma));
        assert_eq!(b64("uncertainty_png"), colormap::palette_png_between(&sigma, 0.0, 2.0));
        assert!(b64("error_png").starts_with(b"\x89PNG"));
        assert_eq!(json["uncertainty"]["median"], 1.5); // nearest rank of 4 values: round(1.5) = 2
        assert_eq!(json["uncertainty"]["color_max"], 2.0);
        assert_eq!(json["uncertainty"]["masked_pixels"], 0);
        assert_eq!(json["sparsification"]["kept"][0]["epe"], 0.0);
        assert_eq!(json["width"], 2);
        assert_eq!(json["timings_ms"]["total_ms"], 6.0);
        assert_eq!(json["evaluation"]["epe"], 0.0);
        assert!(json.get("reconstruction").is_none());
        let plain = finished(encode_answer(&context(OutputFormat::Json, false, None), &map, Some(&sigma)));
        assert!(plain["images"].get("pfm").is_none() && plain["images"].get("error_png").is_none());
        assert!(plain["images"].get("uncertainty_pfm").is_none() && plain.get("sparsification").is_none());
    }

    #[test]
    fn max_uncertainty_masks_every_disparity_output_alike_and_scores_the_rest() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let sigma = DisparityMap::new(2, 2, vec![0.5, 1.0, 1.5, 2.0]).unwrap();
        let truth = DisparityMap::new(2, 2, vec![1.0, 2.0, 13.0, 14.0]).unwrap();
        let masked = DisparityMap::new(2, 2, vec![1.0, 2.0, f32::INFINITY, f32::INFINITY]).unwrap();
        let limited = |format| AnswerContext { max_uncertainty: Some(1.0), ..context(format, true, Some(&truth)) };
        let json = finished(encode_answer(&limited(OutputFormat::Json), &map, Some(&sigma)));
        let b64 = |key: &str| {
            base64::engine::general_purpose::STANDARD.decode(json["images"][key].as_str().unwrap()).unwrap()
        };
        assert_eq!(b64("pfm"), pfm::encode(&masked));
        assert_eq!(b64("kitti_png16"), kitti::encode_png16(&masked));
        assert_eq!(b64("uncertainty_pfm"), pfm::encode(&sigma), "the deviation keeps every pixel");
        assert_eq!(
            (json["uncertainty"]["masked_pixels"].as_u64(), json["uncertainty"]["max_uncertainty"].as_f64()),
            (Some(2), Some(1.0))
        );
        // The whole answer is scored (two 10 px errors), the kept pixels are perfect.
        assert_eq!(json["evaluation"]["epe"], 5.0);
        assert_eq!(
            (json["evaluation_kept"]["epe"].as_f64(), json["evaluation_kept"]["valid_pixels"].as_u64()),
            (Some(0.0), Some(2))
        );
        for (format, expected) in
            [(OutputFormat::Pfm, pfm::encode(&masked)), (OutputFormat::Png16, kitti::encode_png16(&masked))]
        {
            let answer = encode_answer(&limited(format), &map, Some(&sigma));
            assert_eq!(answer.masked_pixels, Some(2));
            let EncodedAnswer::File { bytes, .. } = answer.body else { panic!("{format:?}") };
            assert_eq!(bytes, expected, "{format:?}");
        }
        let EncodedAnswer::File { bytes, .. } =
            encode_answer(&limited(OutputFormat::Uncertainty), &map, Some(&sigma)).body
        else {
            panic!("not a file")
        };
        assert_eq!(bytes, pfm::encode(&sigma));
    }

    #[test]
    fn every_file_format_has_its_content_type() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        for (format, kind) in [
            (OutputFormat::Png16, "image/png"),
            (OutputFormat::Color, "image/png"),
            (OutputFormat::Pfm, "application/x-portable-floatmap"),
            (OutputFormat::Uncertainty, "application/x-portable-floatmap"),
        ] {
            let EncodedAnswer::File { content_type, bytes, .. } =
                encode_answer(&context(format, false, None), &map, Some(&map)).body
            else {
                panic!("{format:?}")
            };
            assert_eq!(content_type, kind);
            assert!(!bytes.is_empty());
        }
    }

    #[test]
    fn server_timing_lists_every_phase() {
        let t = Timings { decode_ms: 1.5, queue_ms: 0.0, inference_ms: 20.25, encode_ms: 3.0, total_ms: 25.0 };
        assert_eq!(t.server_timing(), "decode;dur=1.5, queue;dur=0, inference;dur=20.25, encode;dur=3, total;dur=25");
    }
}
