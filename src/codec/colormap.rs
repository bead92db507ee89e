//! Colourising a disparity map with the turbo colormap, for people to look at.
//!
//! Turbo (Mikhail, Google 2019) is perceptually smoother than jet and keeps
//! its contrast everywhere; we evaluate the published degree-5 polynomial fit
//! instead of shipping a 256-entry table. `static/app.js` evaluates the same
//! polynomial for the colour bar, so the bar and the image always agree.

use image::{ExtendedColorType, RgbImage};

use crate::disparity::DisparityMap;

// Polynomial coefficients, constant term first, for each channel.
const RED: [f64; 6] = [0.135_721_38, 4.615_392_60, -42.660_322_58, 132.131_082_34, -152.942_393_96, 59.286_379_43];
const GREEN: [f64; 6] = [0.091_402_61, 2.194_188_39, 4.842_966_58, -14.185_033_33, 4.277_298_57, 2.829_566_04];
const BLUE: [f64; 6] = [0.106_673_30, 12.641_946_08, -60.582_048_36, 110.362_767_71, -89.903_109_12, 27.348_249_73];

/// Colour of `t` in [0, 1] (clamped) on the turbo scale: dark blue -> green -> dark red.
pub fn turbo(t: f64) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let channel = |c: &[f64; 6]| {
        // Horner's rule, highest power first.
        let v = c.iter().rev().fold(0.0, |acc, k| acc * t + k);
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    [channel(&RED), channel(&GREEN), channel(&BLUE)]
}

/// Colourises `map` so that `lo` is the coldest and `hi` the hottest colour.
/// Non-finite values (no disparity) are drawn black.
pub fn colorize(map: &DisparityMap, lo: f32, hi: f32) -> RgbImage {
    let span = f64::from(hi - lo);
    let raw: Vec<u8> = map
        .values()
        .iter()
        .flat_map(|&d| {
            if !d.is_finite() {
                [0, 0, 0]
            } else if span > 0.0 {
                turbo(f64::from(d - lo) / span)
            } else {
                turbo(0.5)
            }
        })
        .collect();
    RgbImage::from_raw(map.width(), map.height(), raw).expect("three bytes per pixel")
}

/// Colour PNG of `map`, scaled from its own minimum to its maximum.
pub fn color_png(map: &DisparityMap) -> Vec<u8> {
    let stats = map.stats();
    let image = colorize(map, stats.min, stats.max);
    super::png_bytes(image.as_raw(), map.width(), map.height(), ExtendedColorType::Rgb8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_end_points_and_middle() {
        // Published turbo: starts dark blue-violet, ends dark red, green-cyan in the middle.
        assert_eq!(turbo(0.0), [35, 23, 27]);
        let end = turbo(1.0);
        assert!(end[0] > 100 && end[1] < 30 && end[2] < 30, "{end:?}");
        let mid = turbo(0.5);
        assert!(mid[1] > 200 && mid[0] < 200, "{mid:?}");
        assert_eq!(turbo(-3.0), turbo(0.0));
        assert_eq!(turbo(7.0), turbo(1.0));
        assert_eq!(turbo(f64::NAN), turbo(0.0));
    }

    #[test]
    fn turbo_is_perceptually_ordered() {
        // Luma rises to the middle then falls, with no jumps between neighbours.
        let luma = |c: [u8; 3]| 0.299 * f64::from(c[0]) + 0.587 * f64::from(c[1]) + 0.114 * f64::from(c[2]);
        let samples: Vec<f64> = (0..=100).map(|i| luma(turbo(i as f64 / 100.0))).collect();
        for pair in samples.windows(2) {
            assert!((pair[1] - pair[0]).abs() < 12.0, "jump in turbo: {pair:?}");
        }
        assert!(samples[50] > samples[0] + 100.0 && samples[50] > samples[100] + 60.0);
    }

    #[test]
    fn colorize_spans_range_and_blackens_missing_values() {
        let map = DisparityMap::new(3, 1, vec![10.0, 20.0, f32::NAN]).unwrap();
        let image = colorize(&map, 10.0, 20.0);
        assert_eq!(image.get_pixel(0, 0).0, turbo(0.0));
        assert_eq!(image.get_pixel(1, 0).0, turbo(1.0));
        assert_eq!(image.get_pixel(2, 0).0, [0, 0, 0]);
        // A flat map gets one mid-scale colour rather than a division by zero.
        let flat = DisparityMap::new(1, 1, vec![5.0]).unwrap();
        assert_eq!(colorize(&flat, 5.0, 5.0).get_pixel(0, 0).0, turbo(0.5));
    }

    #[test]
    fn color_png_round_trips_through_a_decoder() {
        let map = DisparityMap::new(4, 2, (0..8).map(|v| v as f32).collect()).unwrap();
        let decoded = image::load_from_memory(&color_png(&map)).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (4, 2));
        assert_eq!(decoded.get_pixel(0, 0).0, turbo(0.0));
        assert_eq!(decoded.get_pixel(3, 1).0, turbo(1.0));
    }
}
