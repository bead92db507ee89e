//! Colourising a disparity map with the turbo colormap, for people to look at.
//!
//! Turbo (Mikhail, Google 2019) is perceptually smoother than jet and keeps
//! its contrast everywhere; we evaluate the published degree-5 polynomial fit
//! instead of shipping a 256-entry table. `static/app.js` evaluates the same
//! polynomial for the colour bar, so the bar and the image always agree.

use image::RgbImage;

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
        round_byte(v.clamp(0.0, 1.0) * 255.0)
    };
    [channel(&RED), channel(&GREEN), channel(&BLUE)]
}

/// `x.round() as u8` for `x` in [0, 255], without the libm call `round` is on
/// baseline x86-64 (it was most of the colour map's time): the integer part,
/// plus one when the fraction is at least a half. Both the truncation and the
/// subtraction are exact there, so this is `round` (half away from zero).
#[inline]
fn round_byte(x: f64) -> u8 {
    let whole = x as u32;
    (whole + u32::from(x - f64::from(whole) >= 0.5)) as u8
}

/// Cells of the lookup table over t in [0, 1]: 2^16, so that the cell of `t`
/// is `floor(t * 2^16)` computed exactly (scaling by a power of two is exact).
const CELLS: usize = 1 << 16;

/// `turbo` as a table, exactly: a cell holds a colour only where `turbo` is
/// proven constant over the whole cell, else it says "evaluate".
///
/// A cell is constant when, for each channel, the polynomial is monotone on
/// it (no sign change of its derivative within two cells) and the channel's
/// value before rounding, `clamp(P(t)) * 255`, lies in the same rounding
/// bucket at both ends and at least 1e-9 from the bucket's edges. Between the
/// ends the exact polynomial then stays in that bucket, and the evaluation's
/// own rounding error (below 1e-12 here) cannot carry it out. About 98 % of
/// cells hold a colour; the rest fall back to `turbo`.
struct TurboTable {
    /// RGB, and 1 in the last byte where the cell must be evaluated.
    cells: Vec<[u8; 4]>,
}

fn channel_value(c: &[f64; 6], t: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, k| acc * t + k).clamp(0.0, 1.0) * 255.0
}

fn derivative(c: &[f64; 6], t: f64) -> f64 {
    (1..6).rev().fold(0.0, |acc, k| acc * t + k as f64 * c[k])
}

impl TurboTable {
    fn build() -> TurboTable {
        let mut unsafe_cell = vec![false; CELLS];
        // Extrema: sign changes of each derivative, sampled 16 times a cell.
        for c in [&RED, &GREEN, &BLUE] {
            let samples = CELLS * 16;
            let mut previous = derivative(c, 0.0).signum();
            for i in 1..=samples {
                let sign = derivative(c, i as f64 / samples as f64).signum();
                if sign != previous {
                    let cell = i / 16;
                    unsafe_cell[cell.saturating_sub(2)..=(cell + 2).min(CELLS - 1)].fill(true);
                }
                previous = sign;
            }
        }
        let cells = (0..CELLS)
            .map(|i| {
                let (a, b) = (i as f64 / CELLS as f64, (i + 1) as f64 / CELLS as f64);
                let settled = |c: &[f64; 6]| {
                    let (va, vb) = (channel_value(c, a), channel_value(c, b));
                    // Distance to the nearest rounding edge, k + 0.5.
                    let edge_distance = |v: f64| (v - v.floor() - 0.5).abs();
                    round_byte(va) == round_byte(vb) && edge_distance(va) > 1e-9 && edge_distance(vb) > 1e-9
                };
                if unsafe_cell[i] || ![&RED, &GREEN, &BLUE].into_iter().all(settled) {
                    [0, 0, 0, 1]
                } else {
                    let [r, g, b] = turbo(a);
                    [r, g, b, 0]
                }
            })
            .collect();
        TurboTable { cells }
    }

    fn get() -> &'static TurboTable {
        static TABLE: std::sync::OnceLock<TurboTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(TurboTable::build)
    }

    /// `turbo(t)`, the same colour for every `t`.
    #[inline]
    fn colour(&self, t: f64) -> [u8; 3] {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let cell = (t * CELLS as f64) as usize;
        match self.cells.get(cell) {
            Some(&[r, g, b, 0]) => [r, g, b],
            _ => turbo(t),
        }
    }
}

/// Builds the colour table now (about 10 ms) rather than in the first request.
pub fn prepare() {
    TurboTable::get();
}

/// Paints `values` into `raw` (three bytes each): the turbo colour of
/// `t_of(value)` (0 coldest, 1 hottest), black where a value is not finite.
fn paint(table: &TurboTable, values: &[f32], raw: &mut [u8], t_of: &impl Fn(f32) -> f64) {
    for (rgb, &v) in raw.chunks_exact_mut(3).zip(values) {
        rgb.copy_from_slice(&if v.is_finite() { table.colour(t_of(v)) } else { [0, 0, 0] });
    }
}

/// Position on the colour scale of `d` between `lo` and `lo + span`; the
/// middle when the range is empty.
fn scale(lo: f32, span: f64) -> impl Fn(f32) -> f64 + Sync {
    move |d| if span > 0.0 { f64::from(d - lo) / span } else { 0.5 }
}

/// Colourises `map` so that `lo` is the coldest and `hi` the hottest colour.
/// Non-finite values (no disparity) are drawn black.
pub fn colorize(map: &DisparityMap, lo: f32, hi: f32) -> RgbImage {
    let mut raw = vec![0u8; map.values().len() * 3];
    paint(TurboTable::get(), map.values(), &mut raw, &scale(lo, f64::from(hi - lo)));
    RgbImage::from_raw(map.width(), map.height(), raw).expect("three bytes per pixel")
}

/// Colour PNG of `map`, scaled from its own minimum to its maximum.
pub fn color_png(map: &DisparityMap) -> Vec<u8> {
    let stats = map.stats();
    color_png_between(map, stats.min, stats.max)
}

/// Colour PNG of `map` scaled from `lo` to `hi`, for callers that already
/// have the map's range (the server computes its statistics once per answer).
pub fn color_png_between(map: &DisparityMap, lo: f32, hi: f32) -> Vec<u8> {
    turbo_png(map.width(), map.height(), map.values(), scale(lo, f64::from(hi - lo)))
}

/// Colour PNG of `values` (`width` a row): the turbo colour of `t_of(value)`
/// (0 coldest, 1 hottest), black where a value is not finite. Painted row by
/// row on the PNG writer's threads, with no image in between.
pub fn turbo_png(width: u32, height: u32, values: &[f32], t_of: impl Fn(f32) -> f64 + Sync) -> Vec<u8> {
    let table = TurboTable::get();
    let w = width as usize;
    super::striped_png::encode_rows(width, height, super::PixelKind::Rgb8, None, |y, row| {
        paint(table, &values[y * w..(y + 1) * w], row, &t_of)
    })
}

/// Turbo levels of [`palette_png_between`]; one more palette entry is black.
const LEVELS: usize = 255;

/// Colour PNG of `map` on 255 turbo levels from `lo` to `hi` (values beyond
/// are drawn as the end colours), black where a value is not finite: an
/// indexed PNG, one byte a pixel. For the deviation map beside the disparity,
/// where 255 levels are more than an eye tells apart; a third of the bytes to
/// filter and deflate makes it about twice as fast and half the size of a
/// true-colour PNG at KITTI size (`make bench-request`: `sigma_color_png`).
pub fn palette_png_between(map: &DisparityMap, lo: f32, hi: f32) -> Vec<u8> {
    let span = f64::from(hi - lo);
    let last = (LEVELS - 1) as f64;
    let index = |v: f32| -> u8 {
        if !v.is_finite() {
            return LEVELS as u8; // black
        }
        let t = if span > 0.0 { (f64::from(v - lo) / span).clamp(0.0, 1.0) } else { 0.5 };
        round_byte(t * last)
    };
    let mut palette = Vec::with_capacity((LEVELS + 1) * 3);
    for k in 0..LEVELS {
        palette.extend_from_slice(&turbo(k as f64 / last));
    }
    palette.extend_from_slice(&[0, 0, 0]);
    let width = map.width() as usize;
    let values = map.values();
    super::striped_png::encode_rows(map.width(), map.height(), super::PixelKind::Indexed, Some(&palette), |y, row| {
        for (out, &v) in row.iter_mut().zip(&values[y * width..(y + 1) * width]) {
            *out = index(v);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_png_has_255_turbo_levels_and_black_for_no_value() {
        let map = DisparityMap::new(4, 1, vec![0.0, 1.0, 2.0, f32::INFINITY]).unwrap();
        let png = palette_png_between(&map, 0.0, 2.0);
        let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
        assert_eq!(rgb.get_pixel(0, 0).0, turbo(0.0));
        assert_eq!(rgb.get_pixel(1, 0).0, turbo(127.0 / 254.0));
        assert_eq!(rgb.get_pixel(2, 0).0, turbo(1.0));
        assert_eq!(rgb.get_pixel(3, 0).0, [0, 0, 0]);
        // Beyond the range: the end colours.
        let wide = DisparityMap::new(2, 1, vec![-5.0, 50.0]).unwrap();
        let rgb = image::load_from_memory(&palette_png_between(&wide, 0.0, 2.0)).unwrap().into_rgb8();
        assert_eq!((rgb.get_pixel(0, 0).0, rgb.get_pixel(1, 0).0), (turbo(0.0), turbo(1.0)));
    }

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
    fn round_byte_is_round_for_every_kind_of_value() {
        let mut cases = vec![0.0, 0.5, 1.5, 2.5, 254.5, 255.0, 0.49999999999999994, 127.49999999999999, 3.0000001];
        for k in 0..=255 {
            let k = f64::from(k);
            // Around every integer and every half, including the neighbouring doubles.
            for x in [k, k + 0.5, k - 0.5] {
                cases.extend([
                    x,
                    f64::from_bits(x.to_bits().saturating_add(1)),
                    f64::from_bits(x.to_bits().saturating_sub(1)),
                ]);
            }
        }
        cases.extend((0..100_000).map(|i| f64::from(i) * 255.0 / 100_000.0));
        for x in cases.into_iter().filter(|x| (0.0..=255.0).contains(x)) {
            assert_eq!(round_byte(x), x.round() as u8, "{x:e}");
        }
    }

    #[test]
    fn the_table_gives_turbos_colour_for_every_kind_of_t() {
        let table = TurboTable::get();
        let evaluated = table.cells.iter().filter(|c| c[3] == 1).count();
        assert!(evaluated < CELLS / 10, "{evaluated} of {CELLS} cells fall back");
        let mut cases = vec![0.0, 1.0, -0.5, 2.0, f64::NAN, 0.5, 1e-300, 1.0 - f64::EPSILON];
        // Every cell edge, its neighbouring doubles and the cell's middle.
        for i in 0..=CELLS {
            let edge = i as f64 / CELLS as f64;
            cases.extend([edge, f64::from_bits(edge.to_bits() + 1), edge + 0.5 / CELLS as f64]);
            if edge > 0.0 {
                cases.push(f64::from_bits(edge.to_bits() - 1));
            }
        }
        // And a dense pseudo-random sweep.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push((x >> 11) as f64 / (1u64 << 53) as f64);
        }
        for t in cases {
            assert_eq!(table.colour(t), turbo(t), "t = {t:e}");
        }
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
