//! The KITTI 16-bit PNG disparity convention.
//!
//! `uint16 = round(d * 256)`, clamped to 65535 (255.996 px), and 0 means "no
//! value". Lossless to 1/256 px over the range PSMNet can output (0..192), and
//! readable by the KITTI development kit and most stereo tooling.

use image::ImageFormat;

use crate::disparity::DisparityMap;

/// Scale between pixels of disparity and stored integer units.
pub const SCALE: f32 = 256.0;

/// Why a KITTI disparity PNG could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KittiError {
    #[error("not a PNG image: {0}")]
    Decode(String),
    #[error("a KITTI disparity PNG is single-channel 16-bit, this one is {0:?}")]
    WrongPixelType(image::ColorType),
}

/// Stored integer for one disparity; non-finite and negative values become 0 (no value).
///
/// `round(d * 256)` clamped to 65535, computed without the libm call `round`
/// is on baseline x86-64: below 65534.5 the truncation and the fraction are
/// exact in f32, so "integer part, plus one from a half up" is `round`; from
/// 65534.5 up, `round` gives at least 65535, which the clamp makes 65535.
pub fn encode_value(d: f32) -> u16 {
    if !d.is_finite() || d <= 0.0 {
        return 0;
    }
    let scaled = d * SCALE;
    if scaled >= 65_534.5 {
        return u16::MAX;
    }
    let whole = scaled as u32;
    (whole + u32::from(scaled - whole as f32 >= 0.5)) as u16
}

/// 16-bit greyscale PNG of `map` in the KITTI convention.
pub fn encode_png16(map: &DisparityMap) -> Vec<u8> {
    // Samples are written big-endian, as PNG stores them, row by row on the
    // PNG writer's threads.
    let width = map.width() as usize;
    let values = map.values();
    super::striped_png::encode_rows(map.width(), map.height(), super::PixelKind::Gray16, None, |y, row| {
        for (out, &d) in row.chunks_exact_mut(2).zip(&values[y * width..(y + 1) * width]) {
            out.copy_from_slice(&encode_value(d).to_be_bytes());
        }
    })
}

/// Reads a KITTI disparity PNG; pixels without a value become `f32::INFINITY`
/// (the same marker Middlebury PFM ground truth uses).
pub fn decode_png16(bytes: &[u8]) -> Result<DisparityMap, KittiError> {
    let image =
        image::load_from_memory_with_format(bytes, ImageFormat::Png).map_err(|e| KittiError::Decode(e.to_string()))?;
    let image::DynamicImage::ImageLuma16(grey) = image else {
        return Err(KittiError::WrongPixelType(image.color()));
    };
    let (width, height) = grey.dimensions();
    let values =
        grey.into_raw().into_iter().map(|v| if v == 0 { f32::INFINITY } else { f32::from(v) / SCALE }).collect();
    Ok(DisparityMap::new(width, height, values).expect("one value per pixel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_round_of_d_times_256() {
        assert_eq!(encode_value(1.0), 256);
        assert_eq!(encode_value(12.3456), 3160); // 3160.47 rounds down
        assert_eq!(encode_value(0.001), 0);
        assert_eq!(encode_value(191.999), 49152);
        assert_eq!(encode_value(300.0), 65535);
        assert_eq!(encode_value(-2.0), 0);
        assert_eq!(encode_value(f32::NAN), 0);
        assert_eq!(encode_value(f32::INFINITY), 0);
    }

    #[test]
    fn encode_value_is_round_of_d_times_256_clamped_for_every_kind_of_value() {
        let reference = |d: f32| {
            if !d.is_finite() || d <= 0.0 {
                0
            } else {
                (d * SCALE).round().min(f32::from(u16::MAX)) as u16
            }
        };
        let mut cases: Vec<f32> = vec![f32::MAX, f32::MIN_POSITIVE, 1e-30, 255.998, 255.99805, 255.999, 256.0, 1e9];
        // Every stored unit's half-way point and its neighbouring floats, over the whole range.
        for k in 0..=65_536u32 {
            let half = (k as f32 + 0.5) / SCALE;
            cases.extend([half, f32::from_bits(half.to_bits() + 1), f32::from_bits(half.to_bits() - 1)]);
        }
        for d in cases {
            assert_eq!(encode_value(d), reference(d), "{d:e}");
        }
    }

    #[test]
    fn png16_round_trips_within_half_a_unit() {
        let values = vec![0.5, 17.25, 63.999, 191.5, 1.0 / 256.0, 100.0];
        let map = DisparityMap::new(3, 2, values.clone()).unwrap();
        let png = encode_png16(&map);
        // The file really is 16-bit greyscale.
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!(decoded.color(), image::ColorType::L16);
        let back = decode_png16(&png).unwrap();
        assert_eq!((back.width(), back.height()), (3, 2));
        for (a, b) in values.iter().zip(back.values()) {
            assert!((a - b).abs() <= 0.5 / SCALE, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_reads_back_as_no_value() {
        let map = DisparityMap::new(2, 1, vec![f32::NAN, 4.0]).unwrap();
        let back = decode_png16(&encode_png16(&map)).unwrap();
        assert_eq!(back.values(), &[f32::INFINITY, 4.0]);
    }

    #[test]
    fn eight_bit_png_is_not_a_kitti_map() {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(2, 2).write_to(&mut png, ImageFormat::Png).unwrap();
        assert!(matches!(decode_png16(png.get_ref()), Err(KittiError::WrongPixelType(_))));
    }
}
