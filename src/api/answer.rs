//! Turning a disparity map into the bytes of the answer the client asked for.
//!
//! This is the CPU work after inference (the "encode" phase of `Server-Timing`):
//! PNGs, PFMs, PLYs, scores and, for `format=json`, one JSON document carrying
//! the images in base64. It is synchronous and pure (no HTTP types), so the
//! handler runs it on the blocking pool and the request bench
//! (`tests/bench/request.rs`) times exactly the server's code.
//!
//! Speed decisions, measured with `make bench-request` (README Performance):
//! - The images of one JSON answer are encoded side by side on scoped threads,
//!   each straight to base64, and the JSON document is written once into one
//!   buffer: no base64 `String`s, no serde pass over megabytes of text.
//! - The `images` object comes first in the document, so the small fields after
//!   it (with the timings, known only at the end) are appended, not inserted.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationFormat;
use crate::codec::{colormap, kitti, pfm, png_bytes};
use crate::disparity::{DisparityMap, DisparityStats};
use crate::eval::{error_map, evaluate, Metrics};
use crate::geometry::{self, Mat3};
use crate::reconstruct::{depth_map, encode_ply, DepthMap, DepthStats};
use crate::rectify::{Rectification, StereoCamera};

/// What the client wants back.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
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
    /// The format's name when it needs a calibration, else `None`.
    pub fn needs_calibration(self) -> Option<&'static str> {
        match self {
            OutputFormat::Depth => Some("depth"),
            OutputFormat::Depth16 => Some("depth16"),
            OutputFormat::Ply => Some("ply"),
            _ => None,
        }
    }

    /// Whether the answer needs the depth map (not a raw disparity file).
    fn carries_depth(self) -> bool {
        matches!(self, OutputFormat::Json | OutputFormat::Depth | OutputFormat::Depth16 | OutputFormat::Ply)
    }
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
pub struct AnswerContext {
    pub format: OutputFormat,
    /// With `format=json`, also include the float PFM(s) in base64.
    pub include_pfm: bool,
    /// Ground truth to score against and draw the error map of.
    pub truth: Option<DisparityMap>,
    pub reconstruction: Option<Reconstruction>,
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
    pub width: u32,
    pub height: u32,
    pub disparity: DisparityStats,
    pub device: &'a str,
    pub model: &'a str,
    pub precision: &'a str,
    pub timings_ms: Timings,
    /// Scores against the uploaded ground truth, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Metrics>,
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
    /// The disparity in colour (turbo, from the map's min to its max).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub color_png: String,
    /// KITTI 16-bit PNG: `round(d * 256)`, 0 = no value.
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub kitti_png16: String,
    /// float32 PFM of the disparity (with `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub pfm: Option<String>,
    /// Error against the ground truth, coloured (with a ground truth).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub error_png: Option<String>,
    /// Depth in colour (with a calibration).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub depth_color_png: Option<String>,
    /// float32 PFM of the depth, calibration units, +inf = none (with a calibration and `include_pfm=true`).
    #[schema(content_encoding = "base64", content_media_type = "application/x-portable-floatmap")]
    pub depth_pfm: Option<String>,
    /// The left image after rectification, which the maps refer to (when the server rectified).
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub rectified_left_png: Option<String>,
}

/// An answer with its bytes made, before the total time is known.
pub enum EncodedAnswer {
    /// `{"images":{...}` written; [`EncodedAnswer::finish_json`] closes it.
    Json {
        partial: Vec<u8>,
        reconstruction: Option<Box<ReconstructionSummary>>,
    },
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
    pub evaluation: Option<Metrics>,
    /// Units of depth outputs (`x-depth-units`), when a calibration was sent.
    pub depth_units: Option<&'static str>,
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

/// Encodes the answer for `map` as `context` asks. The server's encode phase.
pub fn encode_answer(context: &AnswerContext, map: &DisparityMap) -> Answer {
    let truth = context.truth.as_ref();
    let reconstruction = context.reconstruction.as_ref();
    let depth = reconstruction
        .filter(|_| context.format.carries_depth())
        .map(|r| depth_map(map, &r.rectification.camera, r.max_depth));
    // One pass over the map for its statistics, shared with the colour PNG's range.
    let stats = map.stats();
    let file = |bytes, content_type, file_name| EncodedAnswer::File { bytes, content_type, file_name };
    let body = match context.format {
        OutputFormat::Json => encode_json(map, &stats, context.include_pfm, truth, reconstruction, depth.as_ref()),
        OutputFormat::Png16 => file(kitti::encode_png16(map), "image/png", "disparity_kitti16.png"),
        OutputFormat::Color => {
            file(colormap::color_png_between(map, stats.min, stats.max), "image/png", "disparity_color.png")
        }
        OutputFormat::Pfm => file(pfm::encode(map), "application/x-portable-floatmap", "disparity.pfm"),
        // The handler refuses these formats without a calibration before inference.
        OutputFormat::Depth => {
            file(depth.as_ref().expect("calibration checked").to_pfm(), "application/x-portable-floatmap", "depth.pfm")
        }
        OutputFormat::Depth16 => {
            file(depth.as_ref().expect("calibration checked").to_png16_mm(), "image/png", "depth_mm.png")
        }
        OutputFormat::Ply => {
            let r = reconstruction.expect("calibration checked");
            let to_left = geometry::transpose(&r.rectification.r_left);
            let points = depth.as_ref().expect("calibration checked").point_cloud(&r.colours, &to_left);
            file(encode_ply(&points, r.rectification.camera.units.symbol()), "application/octet-stream", "points.ply")
        }
    };
    Answer {
        body,
        stats,
        evaluation: truth.map(|truth| evaluate(map, truth, crate::eval::DEFAULT_MAXDISP)),
        depth_units: reconstruction.map(|r| r.rectification.camera.units.symbol()),
    }
}

/// One image of the JSON answer: its key and how to make its file.
type ImageJob<'a> = (&'static str, Box<dyn FnOnce() -> Vec<u8> + Send + 'a>);

/// The JSON answer up to and including its `images` object.
fn encode_json(
    map: &DisparityMap,
    stats: &DisparityStats,
    include_pfm: bool,
    truth: Option<&DisparityMap>,
    reconstruction: Option<&Reconstruction>,
    depth: Option<&DepthMap>,
) -> EncodedAnswer {
    let mut jobs: Vec<ImageJob> = vec![
        ("color_png", Box::new(|| colormap::color_png_between(map, stats.min, stats.max))),
        ("kitti_png16", Box::new(|| kitti::encode_png16(map))),
    ];
    if include_pfm {
        jobs.push(("pfm", Box::new(|| pfm::encode(map))));
    }
    if let Some(truth) = truth {
        jobs.push((
            "error_png",
            Box::new(move || {
                let errors = error_map(map, truth);
                png_bytes(errors.as_raw(), map.width(), map.height(), image::ExtendedColorType::Rgb8)
            }),
        ));
    }
    let mut summary = None;
    if let (Some(r), Some(depth)) = (reconstruction, depth) {
        let rect = &r.rectification;
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
        }));
        jobs.push(("depth_color_png", Box::new(|| depth.to_color_png())));
        if include_pfm {
            jobs.push(("depth_pfm", Box::new(|| depth.to_pfm())));
        }
        if rect.applied {
            jobs.push((
                "rectified_left_png",
                Box::new(|| {
                    let rgb = image::DynamicImage::ImageRgb32F(r.colours.clone()).into_rgb8();
                    png_bytes(rgb.as_raw(), rgb.width(), rgb.height(), image::ExtendedColorType::Rgb8)
                }),
            ));
        }
    }
    EncodedAnswer::Json { partial: images_object(jobs), reconstruction: summary }
}

/// `{"images":{"key":"<base64>",...}` with every image made and base64-encoded
/// side by side, each on its own scoped thread (the first on this one).
fn images_object(jobs: Vec<ImageJob>) -> Vec<u8> {
    let encoded: Vec<(&'static str, Vec<u8>)> = std::thread::scope(|scope| {
        let mut jobs = jobs.into_iter();
        let first = jobs.next();
        let others: Vec<_> = jobs.map(|(key, make)| (key, scope.spawn(move || base64_of(&make())))).collect();
        let mut out: Vec<_> = first.into_iter().map(|(key, make)| (key, base64_of(&make()))).collect();
        out.extend(
            others.into_iter().map(|(key, handle)| (key, handle.join().expect("image encoding does not panic"))),
        );
        out
    });
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

    fn context(format: OutputFormat, include_pfm: bool, truth: Option<DisparityMap>) -> AnswerContext {
        AnswerContext { format, include_pfm, truth, reconstruction: None }
    }

    fn finished(answer: Answer) -> serde_json::Value {
        let EncodedAnswer::Json { partial, reconstruction } = answer.body else { panic!("not JSON") };
        let timings = Timings { decode_ms: 1.0, queue_ms: 0.0, inference_ms: 2.0, encode_ms: 3.0, total_ms: 6.0 };
        let summary = JsonSummary {
            width: 2,
            height: 2,
            disparity: answer.stats,
            device: "cpu",
            model: "m",
            precision: "fp32",
            timings_ms: timings,
            evaluation: answer.evaluation,
            reconstruction: reconstruction.as_deref(),
        };
        serde_json::from_slice(&EncodedAnswer::finish_json(partial, &summary)).expect("valid JSON")
    }

    #[test]
    fn json_answer_is_one_valid_document_with_exact_base64_images() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let json = finished(encode_answer(&context(OutputFormat::Json, true, Some(map.clone())), &map));
        let b64 = |key: &str| {
            base64::engine::general_purpose::STANDARD.decode(json["images"][key].as_str().unwrap()).unwrap()
        };
        assert_eq!(b64("color_png"), colormap::color_png(&map));
        assert_eq!(b64("kitti_png16"), kitti::encode_png16(&map));
        assert_eq!(b64("pfm"), pfm::encode(&map));
        assert!(b64("error_png").starts_with(b"\x89PNG"));
        assert_eq!(json["width"], 2);
        assert_eq!(json["timings_ms"]["total_ms"], 6.0);
        assert_eq!(json["evaluation"]["epe"], 0.0);
        assert!(json.get("reconstruction").is_none());
        let plain = finished(encode_answer(&context(OutputFormat::Json, false, None), &map));
        assert!(plain["images"].get("pfm").is_none() && plain["images"].get("error_png").is_none());
    }

    #[test]
    fn every_file_format_has_its_content_type() {
        let map = DisparityMap::new(2, 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        for (format, kind) in [
            (OutputFormat::Png16, "image/png"),
            (OutputFormat::Color, "image/png"),
            (OutputFormat::Pfm, "application/x-portable-floatmap"),
        ] {
            let EncodedAnswer::File { content_type, bytes, .. } =
                encode_answer(&context(format, false, None), &map).body
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
