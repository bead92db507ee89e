//! Decoding uploaded image bytes into RGB float images, defensively.
//!
//! Uploads are untrusted: the format is sniffed from the bytes (never from a
//! file name or client content type), the declared dimensions are checked
//! against the pixel limit *before* any pixel is decoded (so a tiny file that
//! declares 100000 x 100000 pixels costs nothing), and the decoder itself runs
//! under allocation limits.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits, Rgb32FImage};

/// Formats we accept; anything else is refused even if a decoder exists.
pub const SUPPORTED_FORMATS: [ImageFormat; 5] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::WebP];

/// Why bytes could not become an image. Knows nothing of HTTP.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the file is empty")]
    Empty,
    #[error("the bytes are not a recognised image format (PNG, JPEG, BMP, TIFF or WebP expected)")]
    UnknownFormat,
    #[error("{0} images are not supported (PNG, JPEG, BMP, TIFF or WebP expected)")]
    UnsupportedFormat(String),
    #[error("the image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// The two images of a pair differ in size.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("left image is {left_width}x{left_height} but right image is {right_width}x{right_height}; a rectified pair has one size")]
pub struct SizeMismatch {
    pub left_width: u32,
    pub left_height: u32,
    pub right_width: u32,
    pub right_height: u32,
}

/// Why two uploads could not become a pair of images.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PairError {
    #[error("the left image: {0}")]
    Left(DecodeError),
    #[error("the right image: {0}")]
    Right(DecodeError),
    #[error("{0}")]
    SizeMismatch(#[from] SizeMismatch),
}

/// The size both images of a pair declare in their headers (nothing decoded),
/// checked against `max_pixels` and against each other.
pub fn probe_pair(left: &[u8], right: &[u8], max_pixels: u64) -> Result<(u32, u32), PairError> {
    let (left_width, left_height) = probe(left, max_pixels).map_err(PairError::Left)?;
    let (right_width, right_height) = probe(right, max_pixels).map_err(PairError::Right)?;
    if (left_width, left_height) != (right_width, right_height) {
        return Err(SizeMismatch { left_width, left_height, right_width, right_height }.into());
    }
    Ok((left_width, left_height))
}

/// Decodes the two images of a pair side by side (on the CPU pool). Both headers are read and compared first, so a pair whose sizes
/// differ, or one image over the limit, costs no pixel decoding at all.
pub fn decode_pair(left: &[u8], right: &[u8], max_pixels: u64) -> Result<(Rgb32FImage, Rgb32FImage), PairError> {
    probe_pair(left, right, max_pixels)?;
    let (left, right) = rayon::join(|| decode_rgb(left, max_pixels), || decode_rgb(right, max_pixels));
    Ok((left.map_err(PairError::Left)?, right.map_err(PairError::Right)?))
}

/// Decodes `bytes` into RGB in [0, 1]: 8-bit / 255, 16-bit / 65535, grey repeated
/// to three channels, alpha dropped (as the reference preprocessing does).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<Rgb32FImage, DecodeError> {
    let (width, height) = probe(bytes, max_pixels)?;
    let mut reader = reader(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Room for the decoded image at 16 bits x 4 channels plus decoder scratch space.
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 16 + (64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    Ok(to_rgb_unit(image))
}

/// Float RGB in [0, 1] from 8-bit RGB or RGBA samples (`channels` per pixel;
/// alpha dropped).
pub fn unit_rgb(width: u32, height: u32, raw: &[u8], channels: usize) -> Rgb32FImage {
    let table = unit_table();
    let mut out = vec![0.0f32; width as usize * height as usize * 3];
    for (rgb, pixel) in out.chunks_exact_mut(3).zip(raw.chunks_exact(channels)) {
        for (o, &v) in rgb.iter_mut().zip(pixel) {
            *o = table[usize::from(v)];
        }
    }
    Rgb32FImage::from_raw(width, height, out).expect("three values per pixel")
}

/// `image.to_rgb32f()`, value for value, without its per-sample division for
/// the 8-bit colour layouts uploads nearly always have: a 256-entry table holds the
/// same `v as f32 / 255.0` (clamped) the image crate computes, and the output
/// buffer is written once. Other layouts take the image crate's own path.
pub fn to_rgb_unit(image: DynamicImage) -> Rgb32FImage {
    let channels = match &image {
        DynamicImage::ImageRgb8(_) => 3,
        DynamicImage::ImageRgba8(_) => 4,
        // Grey takes the image crate's own path: it converts through 16 bits,
        // which rounds some values differently from `v / 255`.
        _ => return image.to_rgb32f(),
    };
    unit_rgb(image.width(), image.height(), image.as_bytes(), channels)
}

/// `u8 -> [0, 1]` exactly as the image crate converts a sample.
fn unit_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|v| (v as f32 / f32::from(u8::MAX)).clamp(0.0, 1.0)))
}

/// Reads only the header: the format and the declared size, checked against `max_pixels`.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), DecodeError> {
    let mut reader = reader(bytes)?;
    // Reading the header allocates nothing; our own pixel check below is the limit.
    reader.no_limits();
    let (width, height) = reader.into_dimensions().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!("the image declares a size of {width}x{height}")));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooManyPixels { width, height, pixels, limit: max_pixels });
    }
    Ok((width, height))
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError::UnknownFormat)?;
    if !SUPPORTED_FORMATS.contains(&format) {
        return Err(DecodeError::UnsupportedFormat(format!("{format:?}").to_uppercase()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    Ok(reader)
}

/// How the two views of a stereo frame are packed into one image (videos, stream frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoLayout {
    /// Side by side: the left view in the left half of each frame.
    Sbs,
    /// Top and bottom: the left view in the top half.
    Tb,
}

impl VideoLayout {
    /// The option's value, as messages and the summary show it.
    pub fn label(self) -> &'static str {
        match self {
            VideoLayout::Sbs => "sbs",
            VideoLayout::Tb => "tb",
        }
    }

    /// The size of each view of a `width` x `height` packed frame, or why it cannot be split.
    pub fn view_size(self, width: u32, height: u32) -> Result<(u32, u32), String> {
        match self {
            VideoLayout::Sbs if width.is_multiple_of(2) => Ok((width / 2, height)),
            VideoLayout::Tb if height.is_multiple_of(2) => Ok((width, height / 2)),
            VideoLayout::Sbs => Err(format!("a side-by-side frame needs an even width, not {width}x{height}")),
            VideoLayout::Tb => Err(format!("a top-bottom frame needs an even height, not {width}x{height}")),
        }
    }
}

/// The two views of one packed 8-bit RGB frame `frame_width` pixels wide.
pub fn split_packed(frame: &[u8], frame_width: u32, layout: VideoLayout) -> (bytes::Bytes, bytes::Bytes) {
    let row = frame_width as usize * 3;
    match layout {
        VideoLayout::Tb => {
            let (top, bottom) = frame.split_at(frame.len() / 2);
            (bytes::Bytes::copy_from_slice(top), bytes::Bytes::copy_from_slice(bottom))
        }
        VideoLayout::Sbs => {
            let half = row / 2;
            let (mut left, mut right) = (Vec::with_capacity(frame.len() / 2), Vec::with_capacity(frame.len() / 2));
            for line in frame.chunks_exact(row) {
                left.extend_from_slice(&line[..half]);
                right.extend_from_slice(&line[half..]);
            }
            (bytes::Bytes::from(left), bytes::Bytes::from(right))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, Rgba, RgbaImage};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn grey_is_repeated_and_scaled_to_unit_range() {
        let grey = GrayImage::from_fn(3, 2, |x, _| Luma([(x * 100) as u8]));
        let rgb = decode_rgb(&encode(&DynamicImage::ImageLuma8(grey), ImageFormat::Png), 100).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        let p = rgb.get_pixel(2, 1).0;
        assert!((p[0] - 200.0 / 255.0).abs() < 1e-6 && p[0] == p[1] && p[1] == p[2]);
    }

    #[test]
    fn sixteen_bit_uses_full_precision() {
        let img: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(2, 2, |_, _| Rgb([65535, 32768, 1]));
        let rgb = decode_rgb(&encode(&DynamicImage::ImageRgb16(img), ImageFormat::Png), 100).unwrap();
        let p = rgb.get_pixel(0, 0).0;
        assert!((p[0] - 1.0).abs() < 1e-6);
        assert!((p[1] - 32768.0 / 65535.0).abs() < 1e-6);
        assert!((p[2] - 1.0 / 65535.0).abs() < 1e-7);
    }

    #[test]
    fn alpha_is_dropped() {
        let img = RgbaImage::from_fn(2, 2, |_, _| Rgba([255, 0, 51, 0]));
        let rgb = decode_rgb(&encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png), 100).unwrap();
        assert_eq!(rgb.get_pixel(1, 1).0, [1.0, 0.0, 0.2]);
    }

    #[test]
    fn every_supported_format_decodes() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(8, 8, |x, y| Rgb([x as u8 * 30, y as u8 * 30, 7])));
        for format in SUPPORTED_FORMATS {
            let bytes = encode(&img, format);
            let rgb = decode_rgb(&bytes, 64).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(rgb.dimensions(), (8, 8), "{format:?}");
        }
    }

    #[test]
    fn refuses_garbage_empty_and_truncated_bytes() {
        assert_eq!(decode_rgb(b"", 10), Err(DecodeError::Empty));
        assert_eq!(decode_rgb(b"hello, not an image", 10), Err(DecodeError::UnknownFormat));
        assert_eq!(decode_rgb(b"GIF89a\x01\x00\x01\x00", 10), Err(DecodeError::UnsupportedFormat("GIF".into())));
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 1])));
        let png = encode(&img, ImageFormat::Png);
        assert!(matches!(decode_rgb(&png[..png.len() / 2], 1 << 20), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn refuses_images_over_the_pixel_limit_before_decoding() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(10, 10, |_, _| Rgb([1, 2, 3])));
        let png = encode(&img, ImageFormat::Png);
        assert_eq!(
            decode_rgb(&png, 99),
            Err(DecodeError::TooManyPixels { width: 10, height: 10, pixels: 100, limit: 99 })
        );
        assert!(decode_rgb(&png, 100).is_ok());
    }

    #[test]
    fn a_header_declaring_huge_dimensions_is_refused_cheaply() {
        // A valid PNG header and IHDR chunk declaring 100000 x 100000 pixels, no image data.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // A few bytes of (bogus) image data and the end marker: the file is ~60 bytes.
        for (kind, data) in [(&b"IDAT"[..], &[0x78u8, 0x9c, 0x63, 0x60, 0x00, 0x00][..]), (b"IEND", &[])] {
            let mut chunk = kind.to_vec();
            chunk.extend_from_slice(data);
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(&chunk);
            png.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        let got = decode_rgb(&png, 4_000_000);
        assert!(matches!(got, Err(DecodeError::TooManyPixels { width: 100_000, .. })), "{got:?}");
    }

    #[test]
    fn the_fast_conversion_equals_the_image_crates_bit_for_bit() {
        let rgb = image::RgbImage::from_fn(7, 5, |x, y| Rgb([(x * 37 + y) as u8, (y * 51) as u8, (x * y * 13) as u8]));
        let all: Vec<u8> = (0..=255).collect();
        let cases = [
            DynamicImage::ImageRgb8(rgb.clone()),
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(256, 1, all.repeat(3)).unwrap()),
            DynamicImage::ImageRgba8(RgbaImage::from_fn(6, 4, |x, y| Rgba([x as u8 * 40, y as u8 * 60, 255, 7]))),
            DynamicImage::ImageLuma8(GrayImage::from_raw(256, 1, all.clone()).unwrap()),
            DynamicImage::ImageRgb16(ImageBuffer::from_fn(3, 3, |x, y| {
                Rgb([x as u16 * 9000, y as u16 * 20000, 65535])
            })),
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(4, 2, |x, _| image::LumaA([x as u8 * 60, 9]))),
        ];
        for image in cases {
            let want = image.to_rgb32f();
            let got = to_rgb_unit(image.clone());
            assert_eq!(got.dimensions(), want.dimensions());
            let same = got.as_raw().iter().zip(want.as_raw()).all(|(a, b)| a.to_bits() == b.to_bits());

            assert!(same, "{:?} differs", image.color());
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
