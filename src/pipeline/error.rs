//! Why a pair could not become an answer. Knows nothing of HTTP: each front
//! end maps these to its own protocol (a status and code, a close code, a
//! line in a batch summary).

use crate::calibration::CalibrationError;
use crate::decode::{DecodeError, PairError, SizeMismatch};
use crate::engine::EngineError;
use crate::eval::GroundTruthError;

/// Which image of the pair an error is about.
pub type ImageSide = &'static str;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the '{field}' image: {source}")]
    Image { field: ImageSide, source: DecodeError },
    #[error("{0}")]
    SizeMismatch(#[from] SizeMismatch),
    #[error("the ground truth: {0}")]
    InvalidGroundTruth(#[from] GroundTruthError),
    #[error("the ground truth is {truth_width}x{truth_height} but the images are {width}x{height}")]
    GroundTruthSizeMismatch { truth_width: u32, truth_height: u32, width: u32, height: u32 },
    #[error("the calibration: {0}")]
    Calibration(#[from] CalibrationError),
    #[error("format={0} needs a 'calibration' (cameras and baseline) sent with the images")]
    CalibrationRequired(&'static str),
    #[error("ground truth cannot be scored here: the calibration says the pair is not rectified, and the ground truth is for the original left image")]
    GroundTruthNeedsRectifiedPair,
    #[error("a {width}x{height} image is padded to {padded_width}x{padded_height} for the network (sides multiples of 16, at least 256), {pixels} pixels, over the limit of {limit}")]
    PaddedTooLarge { width: u32, height: u32, padded_width: u32, padded_height: u32, pixels: u64, limit: u64 },
    #[error("the server is receiving and decoding as many uploads as its memory budget allows ({budget_bytes} bytes); retry shortly")]
    BudgetFull { budget_bytes: u64 },
    #[error("{0}")]
    InvalidScale(String),
    #[error("a ground truth is scored at the images' full size: leave out scale (or use `eval --scale`, which upscales the prediction)")]
    ScaleWithGroundTruth,
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// A step's worker went away (a bug, logged; never the client's fault).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<PairError> for PipelineError {
    fn from(e: PairError) -> PipelineError {
        match e {
            PairError::Left(source) => PipelineError::Image { field: "left", source },
            PairError::Right(source) => PipelineError::Image { field: "right", source },
            PairError::SizeMismatch(m) => PipelineError::SizeMismatch(m),
        }
    }
}
