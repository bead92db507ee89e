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

/// Filter of every PNG we write. Measured at KITTI size with the fast deflate
/// (`make bench-request`): "Up" encodes 20 % faster than "Adaptive" for 30 %
/// more bytes; per-request PNGs favour speed.
const PNG_FILTER: FilterType = FilterType::Up;

/// 16-bit greyscale PNG of big-endian samples, with the same settings as [`png_bytes`].
pub(crate) fn png16_bytes(big_endian: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Sixteen);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Up);
    let mut writer = encoder.write_header().expect("a PNG header in memory cannot fail");
    writer.write_image_data(big_endian).expect("PNG encoding into memory of a well-formed buffer cannot fail");
    writer.finish().expect("finishing a PNG in memory cannot fail");
    out
}

/// Encodes raw pixel bytes as PNG, favouring speed: these PNGs are produced per
/// request and a few percent of size is worth less than milliseconds.
pub(crate) fn png_bytes(raw: &[u8], width: u32, height: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PNG_FILTER)
        .write_image(raw, width, height, color)
        .expect("PNG encoding into memory of a well-formed buffer cannot fail");
    out
}
