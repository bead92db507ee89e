//! Output (and ground-truth input) formats for disparity maps.
//!
//! - [`colormap`]: a perceptual colour rendering for people (turbo).
//! - [`kitti`]: the KITTI 16-bit PNG convention, `uint16 = round(d * 256)`, 0 = no value.
//! - [`pfm`]: float32 Middlebury PFM, lossless.
//! - [`striped_png`]: the PNG writer behind every PNG we send, compressing
//!   strips of rows side by side.
//!
//! All are pure functions over [`DisparityMap`](crate::disparity::DisparityMap).

pub mod colormap;
pub mod kitti;
pub mod pfm;
pub mod striped_png;

pub use striped_png::PixelKind;

/// PNG of raw pixel bytes (16-bit samples big-endian), made for speed: these
/// PNGs are produced per request, where a few percent of size is worth less
/// than milliseconds. Rows are "Up"-filtered and compressed in strips side by
/// side ([`striped_png`]); at KITTI size that replaced the `png` crate's
/// fastest single-threaded setting (`make bench-request`: `png_writers`).
pub(crate) fn png_bytes(raw: &[u8], width: u32, height: u32, kind: PixelKind) -> Vec<u8> {
    striped_png::encode(raw, width, height, kind, None)
}
