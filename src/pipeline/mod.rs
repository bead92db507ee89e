//! The one path from a stereo pair to an answer, shared by every front end:
//! `POST /api/v1/disparity`, the Open Inference Protocol, and the command
//! line's `predict` and `eval` only translate their input into a [`Request`]
//! and render the [`Outcome`].
//!
//! ```text
//! Request ──decode──▶ Prepared ──queue, inference──▶ Prediction ──encode──▶ Outcome
//!  (pair bytes or      (pair, truth,      (engine thread)       (maps)     (answers per
//!   pixels, options)    rectification)                                      format, timings)
//! ```
//!
//! - **decode** (CPU pool): the pair's size from its headers (or the tensors'
//!   shape), the decoded bytes admitted to the memory budget *before* any pixel
//!   exists, both images and the ground truth decoded, the padded network input
//!   checked against the pixel limit, the pair rectified when a calibration asks.
//! - **queue** and **inference**: the engine thread, with or without the
//!   deviation's pass as the options need it.
//! - **encode** (CPU pool): every asked format from one set of maps.
//!
//! Each step is timed into [`Timings`], so every front end reports the same
//! phases (`Server-Timing`, the phase histograms, the log line).
//!
//! Dependencies point one way: the front ends use this module, this module
//! uses the engine, the codecs and the geometry; nothing here knows HTTP.

pub mod answer;
pub mod budget;
pub mod error;
pub mod format;
pub mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use answer::{Answer, EncodedAnswer, Timings};
pub use budget::{decoded_pair_bytes, BudgetShare, UploadBudget};
pub use error::PipelineError;
pub use format::OutputFormat;

use crate::calibration::{Calibration, CalibrationFormat};
use crate::decode::{decode_pair, decode_rgb, probe, probe_pair, unit_rgb, DecodeError, VideoLayout};
use crate::disparity::DisparityMap;
use crate::engine::{Engine, EngineStatus, InferencePhases, ModelInfo, StereoPair};
use crate::eval::decode_ground_truth;
use crate::preprocess::PadRule;
use crate::rectify::rectify_pair;
use answer::{ms, AnswerContext, JsonSummary, Reconstruction};

/// The two images, in whichever form the front end has them.
pub enum PairInput {
    /// Encoded image files (PNG, JPEG, BMP, TIFF, WebP), as uploaded or read from disk.
    Files { left: Bytes, right: Bytes },
    /// 8-bit RGB pixels, row-major `[height, width, 3]` (tensors of the Open
    /// Inference Protocol), each exactly `width * height * 3` bytes.
    Pixels { width: u32, height: u32, left: Bytes, right: Bytes },
    /// One encoded image holding both views (a frame of a side-by-side or top-bottom
    /// stereo video); each view is held to the pixel limit, as separate images are.
    Packed { image: Bytes, layout: VideoLayout },
}

/// What to make of the pair besides the disparity.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The answers to encode, each from the same maps (none: the maps only).
    pub formats: Vec<OutputFormat>,
    /// With `json`, also include the float PFMs (base64).
    pub include_pfm: bool,
    /// Scale of an 8-bit ground-truth PNG (disparity = value / scale).
    pub gt_scale: Option<f32>,
    /// With a calibration: leave out points farther than this.
    pub max_depth: Option<f64>,
    /// Give no value to every pixel whose deviation is above this (px).
    pub max_uncertainty: Option<f32>,
    /// With `ply`, each point also carries its deviations.
    pub ply_uncertainty: bool,
    /// Compute the disparity's deviation for the outcome (and a JSON answer)
    /// even when no format or limit needs it.
    pub uncertainty: bool,
    /// Run the network on the pair downscaled by this factor ([`SCALE_RANGE`]); the maps
    /// come at the scaled size, in its pixels. Fewer pixels: about `1 / scale^2` faster.
    pub scale: Option<f32>,
}

/// The smallest and largest `scale`.
pub const SCALE_RANGE: (f32, f32) = (0.25, 1.0);

/// Why a `scale` is not accepted, or `None` when it is.
pub fn scale_problem(scale: f32) -> Option<String> {
    let (low, high) = SCALE_RANGE;
    (!(scale.is_finite() && (low..=high).contains(&scale))).then(|| {
        format!("scale={scale}: give a factor from {low} to {high} (0.5 runs the network on half the width and height)")
    })
}

/// The size a `width` x `height` image is scaled to (each side at least 1 pixel).
pub fn scaled_size(width: u32, height: u32, scale: f32) -> (u32, u32) {
    let side = |n: u32| ((f64::from(n) * f64::from(scale)).round() as u32).max(1);
    (side(width), side(height))
}

impl Options {
    /// The scale to run at, when it is below 1.
    pub fn downscale(&self) -> Option<f32> {
        self.scale.filter(|&s| s < 1.0)
    }

    /// Whether the engine must also give the disparity's deviation.
    pub fn needs_uncertainty(&self) -> bool {
        let in_files = self.formats.iter().any(|f| *f != OutputFormat::Json && f.carries_uncertainty());
        self.uncertainty || in_files || self.max_uncertainty.is_some() || self.ply_uncertainty
    }

    /// The first asked format that needs a calibration, if any.
    pub fn needing_calibration(&self) -> Option<OutputFormat> {
        self.formats.iter().copied().find(|f| f.needs_calibration())
    }
}

/// One pair to answer.
pub struct Request {
    pub pair: PairInput,
    /// Ground-truth disparity (PFM, KITTI 16-bit PNG or 8-bit PNG with `gt_scale`).
    pub ground_truth: Option<Bytes>,
    pub calibration: Option<(Calibration, CalibrationFormat)>,
    pub options: Options,
    /// When the request began on the front end's clock (the total time runs from here).
    pub started: Instant,
    /// The budget share the front end took while receiving the bytes; given
    /// back once the pair is decoded (the decoded pixels then hold their own).
    pub receiving: Option<BudgetShare>,
}

/// What the pipeline made of one pair.
pub struct Outcome {
    /// The answers asked for, in the order asked (JSON documents complete).
    pub answers: Vec<(OutputFormat, Answer)>,
    /// The network's disparity, before any masking.
    pub disparity: DisparityMap,
    /// Its per-pixel standard deviation (px), when computed.
    pub uncertainty: Option<DisparityMap>,
    /// The decoded ground truth, when one was given.
    pub truth: Option<DisparityMap>,
    /// With a calibration: whether the pair was resampled onto rectified cameras.
    pub rectified: Option<bool>,
    /// The factor the pair was downscaled by before the network (none: full size).
    pub scale: Option<f32>,
    pub timings: Timings,
    /// The engine's part of `inference`.
    pub phases: InferencePhases,
    pub model: Option<Arc<ModelInfo>>,
}

impl Outcome {
    /// The answer in `format` (asked in [`Options::formats`]).
    pub fn answer(&self, format: OutputFormat) -> Option<&Answer> {
        self.answers.iter().find(|(f, _)| *f == format).map(|(_, a)| a)
    }
}

/// The decode step's product: everything inference and encoding need.
struct Prepared {
    pair: StereoPair,
    truth: Option<DisparityMap>,
    reconstruction: Option<Reconstruction>,
}

/// The steps from a pair to an answer, with what they share: the engine, the
/// memory budget and the pixel limit.
#[derive(Clone)]
pub struct Pipeline {
    pub engine: Engine,
    pub budget: UploadBudget,
    /// Largest image, in pixels; also bounds the padded network input.
    pub max_pixels: u64,
}

impl Pipeline {
    /// Runs every step for `request`.
    pub async fn run(&self, request: Request) -> Result<Outcome, PipelineError> {
        let Request { pair, ground_truth, calibration, options, started, receiving } = request;
        if let (Some(format), None) = (options.needing_calibration(), &calibration) {
            return Err(PipelineError::CalibrationRequired(format.label()));
        }
        if let Some(problem) = options.scale.and_then(scale_problem) {
            return Err(PipelineError::InvalidScale(problem));
        }
        let scale = options.downscale();
        if scale.is_some() && ground_truth.is_some() {
            return Err(PipelineError::ScaleWithGroundTruth);
        }
        let decode_started = Instant::now();
        let (max_pixels, budget, gt_scale, max_depth) =
            (self.max_pixels, self.budget.clone(), options.gt_scale, options.max_depth);
        let prepared = pool::run(move || {
            let settings = PrepareSettings { max_pixels, gt_scale, max_depth, scale };
            prepare(pair, ground_truth, calibration, &budget, settings)
        })
        .await
        .map_err(PipelineError::Internal)??;
        // The received bytes are gone once decoded; the queue bounds the decoded pairs from here.
        drop(receiving);
        let decode = decode_started.elapsed();

        let Prepared { pair, truth, reconstruction } = prepared;
        let prediction = if options.needs_uncertainty() {
            self.engine.predict_with_uncertainty(pair).await?
        } else {
            self.engine.predict(pair).await?
        };
        let model = match self.engine.status() {
            EngineStatus::Ready(info) => Some(info),
            _ => None,
        };
        let measured = Measured { started, decode, queue: prediction.queue, inference: prediction.inference };
        let rectified = reconstruction.as_ref().map(|r| r.rectification.applied);
        let context = Context { options, truth, reconstruction, model: model.clone() };
        let (disparity, uncertainty, phases) = (prediction.disparity, prediction.uncertainty, prediction.phases);
        let (answers, timings, disparity, uncertainty, truth) = pool::run(move || {
            let (answers, timings) = encode(&context, &disparity, uncertainty.as_ref(), measured);
            (answers, timings, disparity, uncertainty, context.truth)
        })
        .await
        .map_err(PipelineError::Internal)?;
        Ok(Outcome { answers, disparity, uncertainty, truth, rectified, scale, timings, phases, model })
    }
}

/// The clock readings before encoding.
#[derive(Clone, Copy)]
struct Measured {
    started: Instant,
    decode: Duration,
    queue: Duration,
    inference: Duration,
}

/// What encoding needs besides the maps.
struct Context {
    options: Options,
    truth: Option<DisparityMap>,
    reconstruction: Option<Reconstruction>,
    model: Option<Arc<ModelInfo>>,
}

/// Encodes every asked format; a JSON answer is finished with the timings,
/// taken just before its last few hundred bytes are written.
fn encode(
    context: &Context,
    map: &DisparityMap,
    sigma: Option<&DisparityMap>,
    measured: Measured,
) -> (Vec<(OutputFormat, Answer)>, Timings) {
    let encode_started = Instant::now();
    let timings = || Timings {
        decode_ms: ms(measured.decode),
        queue_ms: ms(measured.queue),
        inference_ms: ms(measured.inference),
        encode_ms: ms(encode_started.elapsed()),
        total_ms: ms(measured.started.elapsed()),
    };
    let options = &context.options;
    let mut answers = Vec::with_capacity(options.formats.len());
    for &format in &options.formats {
        let answer_context = AnswerContext {
            format,
            include_pfm: options.include_pfm,
            truth: context.truth.as_ref(),
            reconstruction: context.reconstruction.as_ref(),
            max_uncertainty: options.max_uncertainty,
            ply_uncertainty: options.ply_uncertainty,
        };
        let mut answer = answer::encode_answer(&answer_context, map, sigma);
        if let EncodedAnswer::Json { partial, reconstruction } = answer.body {
            let (device, model, precision) = match &context.model {
                Some(i) => (i.device.as_str(), i.name.as_str(), i.precision.as_str()),
                None => ("", "", ""),
            };
            let summary = JsonSummary {
                width: map.width(),
                height: map.height(),
                scale: options.downscale(),
                disparity: answer.stats,
                device,
                model,
                precision,
                timings_ms: timings(),
                uncertainty: answer.uncertainty,
                evaluation: answer.evaluation,
                sparsification: answer.sparsification.take(),
                evaluation_kept: answer.evaluation_kept,
                reconstruction: reconstruction.as_deref(),
            };
            answer.body = EncodedAnswer::Document(EncodedAnswer::finish_json(partial, &summary));
        }
        answers.push((format, answer));
    }
    (answers, timings())
}

/// The network sees the padded input, so that is what must fit: a 100000 x 1
/// image is small, but padded to 100000 x 256 it is not. The floor of one
/// minimum-size input keeps tiny images (padded to 256 x 256) always allowed.
pub fn check_padded_size(width: u32, height: u32, max_pixels: u64) -> Result<(), PipelineError> {
    let geometry = PadRule::PSMNET.geometry(width, height);
    let pixels = geometry.padded_len() as u64;
    let floor = u64::from(PadRule::PSMNET.min_size).pow(2);
    let limit = max_pixels.max(floor);
    if pixels > limit {
        return Err(PipelineError::PaddedTooLarge {
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

/// The size of a pair of raw pixel buffers, checked like decoded images:
/// against the pixel limit, and each buffer against its size.
fn check_pixels(width: u32, height: u32, left: &[u8], right: &[u8], max_pixels: u64) -> Result<(), PipelineError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        let source = DecodeError::TooManyPixels { width, height, pixels, limit: max_pixels };
        return Err(PipelineError::Image { field: "left", source });
    }
    for (field, bytes) in [("left", left), ("right", right)] {
        // Below the pixel limit, three bytes a pixel cannot overflow.
        if bytes.len() as u64 != pixels * 3 {
            let message = format!("{} bytes for {width}x{height} RGB pixels (needs {})", bytes.len(), pixels * 3);
            return Err(PipelineError::Image { field, source: DecodeError::Corrupt(message) });
        }
    }
    Ok(())
}

/// What errors about a packed frame call it.
const PACKED_FIELD: &str = "frame";

/// The size of each view of a packed frame, from its header: the frame may hold two
/// images' worth of pixels, each view at most one.
fn packed_view_size(image: &[u8], layout: VideoLayout, max_pixels: u64) -> Result<(u32, u32), PipelineError> {
    let image_error = |source| PipelineError::Image { field: PACKED_FIELD, source };
    let (width, height) = probe(image, max_pixels.saturating_mul(2)).map_err(image_error)?;
    let (view_width, view_height) =
        layout.view_size(width, height).map_err(|m| image_error(DecodeError::Corrupt(m)))?;
    let pixels = u64::from(view_width) * u64::from(view_height);
    if pixels > max_pixels {
        return Err(image_error(DecodeError::TooManyPixels {
            width: view_width,
            height: view_height,
            pixels,
            limit: max_pixels,
        }));
    }
    Ok((view_width, view_height))
}

/// The left and right views of a decoded packed frame, each `width` x `height`.
fn unpack_views(
    frame: &image::Rgb32FImage,
    layout: VideoLayout,
    width: u32,
    height: u32,
) -> (image::Rgb32FImage, image::Rgb32FImage) {
    let (x, y) = match layout {
        VideoLayout::Sbs => (width, 0),
        VideoLayout::Tb => (0, height),
    };
    let left = image::imageops::crop_imm(frame, 0, 0, width, height).to_image();
    let right = image::imageops::crop_imm(frame, x, y, width, height).to_image();
    (left, right)
}

/// 8-bit RGB pixels as the network's float input (as a decoded 8-bit image becomes).
fn pixels_to_image(width: u32, height: u32, bytes: &[u8]) -> image::Rgb32FImage {
    unit_rgb(width, height, bytes, 3)
}

/// The options the decode step needs.
#[derive(Clone, Copy)]
struct PrepareSettings {
    max_pixels: u64,
    gt_scale: Option<f32>,
    max_depth: Option<f64>,
    /// Downscale the pair by this factor (below 1) before the network.
    scale: Option<f32>,
}

/// The decode step: sizes first (nothing decoded yet), then the decoded bytes
/// admitted to the budget, then the pixels, the ground truth, the scaling and the rectification.
fn prepare(
    pair: PairInput,
    ground_truth: Option<Bytes>,
    calibration: Option<(Calibration, CalibrationFormat)>,
    budget: &UploadBudget,
    settings: PrepareSettings,
) -> Result<Prepared, PipelineError> {
    let PrepareSettings { max_pixels, gt_scale, max_depth, scale } = settings;
    let (width, height) = match &pair {
        PairInput::Files { left, right } => probe_pair(left, right, max_pixels)?,
        PairInput::Pixels { width, height, left, right } => {
            check_pixels(*width, *height, left, right, max_pixels)?;
            (*width, *height)
        }
        PairInput::Packed { image, layout } => packed_view_size(image, *layout, max_pixels)?,
    };
    check_padded_size(width, height, max_pixels)?;
    let _decoding = budget.admit(decoded_pair_bytes(width, height))?;
    let decode_truth = |bytes: Bytes| decode_ground_truth(&bytes, gt_scale, max_pixels);
    let (images, truth) = rayon::join(
        move || match pair {
            PairInput::Files { left, right } => decode_pair(&left, &right, max_pixels).map_err(PipelineError::from),
            PairInput::Pixels { width, height, left, right } => {
                Ok(rayon::join(|| pixels_to_image(width, height, &left), || pixels_to_image(width, height, &right)))
            }
            PairInput::Packed { image, layout } => {
                let frame = decode_rgb(&image, max_pixels.saturating_mul(2))
                    .map_err(|source| PipelineError::Image { field: PACKED_FIELD, source })?;
                Ok(unpack_views(&frame, layout, width, height))
            }
        },
        move || ground_truth.map(decode_truth).transpose(),
    );
    let (left, right) = images?;
    let truth = truth?;
    if let Some(truth) = &truth {
        if (truth.width(), truth.height()) != (width, height) {
            return Err(PipelineError::GroundTruthSizeMismatch {
                truth_width: truth.width(),
                truth_height: truth.height(),
                width,
                height,
            });
        }
    }
    let (left, right, calibration) = match scale {
        None => (left, right, calibration),
        Some(scale) => {
            let (scaled_width, scaled_height) = scaled_size(width, height, scale);
            let resize = |image: &image::Rgb32FImage| {
                image::imageops::resize(image, scaled_width, scaled_height, image::imageops::FilterType::Triangle)
            };
            let (left, right) = rayon::join(|| resize(&left), || resize(&right));
            let calibration = match calibration {
                None => None,
                Some((calibration, format)) => {
                    calibration.check_size(width, height)?;
                    Some((calibration.scaled((width, height), (scaled_width, scaled_height)), format))
                }
            };
            (left, right, calibration)
        }
    };
    let (width, height) = left.dimensions();
    let (pair, reconstruction) = match calibration {
        None => (StereoPair::new(left, right)?, None),
        Some((calibration, format)) => {
            calibration.check_size(width, height)?;
            if truth.is_some() && !calibration.is_rectified() {
                return Err(PipelineError::GroundTruthNeedsRectifiedPair);
            }
            let (left, right, rectification) = rectify_pair(&calibration, left, right)?;
            let colours = left.clone();
            (StereoPair::new(left, right)?, Some(Reconstruction { format, rectification, colours, max_depth }))
        }
    };
    Ok(Prepared { pair, truth, reconstruction })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_pixels: u64) -> PrepareSettings {
        PrepareSettings { max_pixels, gt_scale: None, max_depth: None, scale: None }
    }

    #[test]
    fn a_scaled_pair_is_resized_before_the_network() {
        assert_eq!(scaled_size(1242, 375, 0.5), (621, 188));
        assert_eq!(scaled_size(3, 3, 0.25), (1, 1));
        assert!(scale_problem(0.5).is_none() && scale_problem(1.0).is_none());
        for bad in [0.2, 1.5, f32::NAN, 0.0] {
            assert!(scale_problem(bad).is_some(), "{bad}");
        }
        let budget = UploadBudget::new(1 << 30);
        let pixels = PairInput::Pixels {
            width: 40,
            height: 20,
            left: Bytes::from(vec![128; 40 * 20 * 3]),
            right: Bytes::from(vec![128; 40 * 20 * 3]),
        };
        let scaled = PrepareSettings { scale: Some(0.5), ..settings(1 << 20) };
        let prepared = prepare(pixels, None, None, &budget, scaled).map_err(|e| e.to_string()).unwrap();
        assert_eq!(prepared.pair.dimensions(), (20, 10));
    }

    #[test]
    fn padded_size_is_what_counts() {
        assert!(check_padded_size(1, 1, 1000).is_ok(), "tiny images always fit");
        assert!(check_padded_size(1024, 1024, 1 << 20).is_ok());
        let Err(PipelineError::PaddedTooLarge { padded_width, padded_height, .. }) =
            check_padded_size(5000, 1, 1 << 20)
        else {
            panic!("a 5000 x 1 image pads to 5008 x 256 = 1.28 M pixels")
        };
        assert_eq!((padded_width, padded_height), (5008, 256));
    }

    #[test]
    fn raw_pixels_are_checked_before_anything_is_allocated() {
        let budget = UploadBudget::new(1 << 30);
        let pixels = |w: u32, h: u32, left: usize, right: usize| PairInput::Pixels {
            width: w,
            height: h,
            left: Bytes::from(vec![0; left]),
            right: Bytes::from(vec![0; right]),
        };
        let run = |pair| prepare(pair, None, None, &budget, settings(1 << 20)).map(|p| p.pair.dimensions());
        assert_eq!(run(pixels(4, 2, 24, 24)).unwrap(), (4, 2));
        assert!(matches!(run(pixels(4, 2, 24, 23)), Err(PipelineError::Image { field: "right", .. })));
        assert!(matches!(
            run(pixels(4096, 4096, 3, 3)),
            Err(PipelineError::Image { field: "left", source: DecodeError::TooManyPixels { .. } })
        ));
    }

    #[test]
    fn packed_frames_are_split_into_views_held_to_the_pixel_limit() {
        let mut frame = image::RgbImage::new(8, 2);
        for (x, _, pixel) in frame.enumerate_pixels_mut() {
            *pixel = image::Rgb([if x < 4 { 10 } else { 200 }, 0, 0]);
        }
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(frame.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(packed_view_size(&png, VideoLayout::Sbs, 8).unwrap(), (4, 2));
        assert_eq!(packed_view_size(&png, VideoLayout::Tb, 8).unwrap(), (8, 1));
        assert!(matches!(
            packed_view_size(&png, VideoLayout::Sbs, 7),
            Err(PipelineError::Image { field: "frame", source: DecodeError::TooManyPixels { .. } })
        ));
        let budget = UploadBudget::new(1 << 30);
        let packed = PairInput::Packed { image: Bytes::from(png), layout: VideoLayout::Sbs };
        let prepared = prepare(packed, None, None, &budget, settings(1 << 20)).map_err(|e| e.to_string());
        assert_eq!(prepared.map(|p| p.pair.dimensions()).unwrap(), (4, 2));
        let decoded = crate::decode::to_rgb_unit(image::DynamicImage::ImageRgb8(frame));
        let (left, right) = unpack_views(&decoded, VideoLayout::Sbs, 4, 2);
        assert!(left.pixels().all(|p| p.0[0] == 10.0 / 255.0) && right.pixels().all(|p| p.0[0] == 200.0 / 255.0));
    }

    #[test]
    fn the_deviation_is_computed_only_when_something_needs_it() {
        let with = |formats: Vec<OutputFormat>| Options { formats, ..Options::default() };
        assert!(!with(vec![OutputFormat::Png16, OutputFormat::Json]).needs_uncertainty());
        assert!(with(vec![OutputFormat::Uncertainty]).needs_uncertainty());
        assert!(Options { max_uncertainty: Some(1.0), ..with(vec![OutputFormat::Pfm]) }.needs_uncertainty());
        assert!(Options { uncertainty: true, ..with(vec![]) }.needs_uncertainty());
        assert_eq!(with(vec![OutputFormat::Pfm, OutputFormat::Ply]).needing_calibration(), Some(OutputFormat::Ply));
    }
}
