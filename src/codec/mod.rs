//! Output (and ground-truth input) formats for disparity maps.
//!
//! - [`colormap`]: a perceptual colour rendering for people (turbo).
//! - [`kitti`]: the KITTI 16-bit PNG convention, `uint16 = round(d * 256)`, 0 = no value.
//! - [`pfm`]: float32 Middlebury PFM, lossless.
//!
//! All are pure functions over [`DisparityMap`](crate::disparity::DisparityMap).

pub mod colormap;
pub mod kitti;
pub mod pfm;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

/// Encodes raw pixel bytes as PNG, favouring speed: these PNGs are produced per
/// request and a few percent of size is worth less than milliseconds.
pub(crate) fn png_bytes(raw: &[u8], width: u32, height: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(raw, width, height, color)
        .expect("PNG encoding into memory of a well-formed buffer cannot fail");
    out
}
