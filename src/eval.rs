//! Accuracy against ground truth, the way the stereo benchmarks measure it.
//!
//! - **EPE**: mean absolute disparity error in pixels.
//! - **D1** (KITTI 2015): % of pixels whose error is > 3 px *and* > 5 % of the true disparity.
//! - **bad-N**: % of pixels whose error is > N px (Middlebury's bad-1, bad-2 and our bad-3).
//!
//! Only pixels with a finite, positive true disparity count. Pixels whose truth is at or
//! beyond the network's `maxdisp` are excluded (PSMNet cannot output them) and counted
//! separately, so a reader sees how much was left out.
//!
//! Ground truth is read from Middlebury PFM (`inf` = none), KITTI 16-bit PNG (value / 256,
//! 0 = none) or an 8-bit PNG with a stated scale (value / scale, 0 = none).

use image::RgbImage;
use serde::Serialize;

use crate::codec::{kitti, pfm};
use crate::disparity::DisparityMap;

/// PSMNet's largest disparity: ground truth at or beyond it is excluded.
pub const DEFAULT_MAXDISP: f32 = 192.0;

/// Error statistics of one prediction (or of several, pooled pixel by pixel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "engine", schema(as = Evaluation))]
pub struct Metrics {
    /// Mean absolute error, px.
    pub epe: f64,
    /// KITTI D1, %.
    pub d1: f64,
    pub bad1: f64,
    pub bad2: f64,
    pub bad3: f64,
    /// Pixels that were scored.
    pub valid_pixels: u64,
    /// Pixels with ground truth at or beyond maxdisp, left out.
    pub excluded_pixels: u64,
}

/// Running sums, so that several pairs pool into one overall figure.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accumulator {
    abs_error: f64,
    d1: u64,
    bad: [u64; 3],
    valid: u64,
    excluded: u64,
}

impl Accumulator {
    /// Adds every scored pixel of `prediction` against `truth` (same size).
    pub fn add(&mut self, prediction: &DisparityMap, truth: &DisparityMap, maxdisp: f32) {
        assert_eq!(
            (prediction.width(), prediction.height()),
            (truth.width(), truth.height()),
            "prediction and ground truth differ in size"
        );
        for (&p, &t) in prediction.values().iter().zip(truth.values()) {
            if !(t.is_finite() && t > 0.0) {
                continue;
            }
            if t >= maxdisp {
                self.excluded += 1;
                continue;
            }
            let e = f64::from((p - t).abs());
            let e = if e.is_finite() { e } else { f64::from(maxdisp) };
            self.abs_error += e;
            self.d1 += u64::from(e > 3.0 && e > 0.05 * f64::from(t));
            for (count, limit) in self.bad.iter_mut().zip([1.0, 2.0, 3.0]) {
                *count += u64::from(e > limit);
            }
            self.valid += 1;
        }
    }

    pub fn merge(&mut self, other: &Accumulator) {
        self.abs_error += other.abs_error;
        self.d1 += other.d1;
        for (a, b) in self.bad.iter_mut().zip(other.bad) {
            *a += b;
        }
        self.valid += other.valid;
        self.excluded += other.excluded;
    }

    pub fn metrics(&self) -> Metrics {
        let n = self.valid.max(1) as f64;
        let pct = |count: u64| 100.0 * count as f64 / n;
        Metrics {
            epe: self.abs_error / n,
            d1: pct(self.d1),
            bad1: pct(self.bad[0]),
            bad2: pct(self.bad[1]),
            bad3: pct(self.bad[2]),
            valid_pixels: self.valid,
            excluded_pixels: self.excluded,
        }
    }
}

/// How well the network's per-pixel standard deviation ranks its own errors,
/// the way the uncertainty literature measures it (sparsification curves):
/// remove the least certain pixels first and watch the error of the rest fall;
/// an oracle that removes the truly worst pixels first bounds how fast it can.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct Sparsification {
    /// EPE and D1 over the most certain 100, 90, 80 and 50 % of the scored pixels.
    pub kept: Vec<KeptMetrics>,
    /// Area under EPE (px) against the fraction removed, 0 to 0.95 in steps of 0.05.
    pub auc_epe: f64,
    /// The same area with pixels removed by their true error (the best possible ranking).
    pub oracle_auc_epe: f64,
    /// Area under D1 (%) against the fraction removed, and the oracle's.
    pub auc_d1: f64,
    pub oracle_auc_d1: f64,
    /// % of scored pixels whose error is at most one standard deviation (about 68 %
    /// for a well-calibrated Gaussian), and at most two (about 95 %).
    pub within_1_sigma: f64,
    pub within_2_sigma: f64,
}

/// Error figures over one most-certain fraction of the scored pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct KeptMetrics {
    /// Fraction of the scored pixels kept, most certain first (1.0 = all).
    pub fraction: f64,
    pub epe: f64,
    /// KITTI D1, %.
    pub d1: f64,
}

/// The fractions [`Sparsification::kept`] reports.
pub const KEPT_FRACTIONS: [f64; 4] = [1.0, 0.9, 0.8, 0.5];

/// The scored pixels of one or more pairs with their deviations, for
/// [`Sparsification`]. The same pixels as [`Accumulator`] scores.
#[derive(Debug, Clone, Default)]
pub struct ScoredPixels {
    /// (absolute error, whether a D1 outlier, standard deviation) per pixel.
    pixels: Vec<(f32, bool, f32)>,
}

impl ScoredPixels {
    /// Adds every scored pixel of `prediction` (with `uncertainty`, same size) against `truth`.
    pub fn add(&mut self, prediction: &DisparityMap, uncertainty: &DisparityMap, truth: &DisparityMap, maxdisp: f32) {
        assert_eq!(
            (prediction.width(), prediction.height(), uncertainty.width(), uncertainty.height()),
            (truth.width(), truth.height(), truth.width(), truth.height()),
            "prediction, uncertainty and ground truth differ in size"
        );
        let values = prediction.values().iter().zip(uncertainty.values()).zip(truth.values());
        for ((&p, &sigma), &t) in values {
            if !(t.is_finite() && t > 0.0) || t >= maxdisp {
                continue;
            }
            let e = (p - t).abs();
            let e = if e.is_finite() { e } else { maxdisp };
            // A deviation that is not a number ranks as the least certain.
            let sigma = if sigma.is_nan() { f32::INFINITY } else { sigma };
            self.pixels.push((e, e > 3.0 && e > 0.05 * t, sigma));
        }
    }

    /// Pools another pair's pixels into these.
    pub fn extend(&mut self, other: &ScoredPixels) {
        self.pixels.extend_from_slice(&other.pixels);
    }

    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// The sparsification figures; `None` without scored pixels.
    pub fn sparsification(&self) -> Option<Sparsification> {
        if self.pixels.is_empty() {
            return None;
        }
        let by_sigma = Curve::ranked(&self.pixels, |a, b| a.2.total_cmp(&b.2));
        let by_error = Curve::ranked(&self.pixels, |a, b| a.0.total_cmp(&b.0));
        let n = self.pixels.len() as f64;
        let within = |k: f32| 100.0 * self.pixels.iter().filter(|(e, _, s)| *e <= k * *s).count() as f64 / n;
        Some(Sparsification {
            kept: KEPT_FRACTIONS
                .iter()
                .map(|&fraction| {
                    let (epe, d1) = by_sigma.at(fraction);
                    KeptMetrics { fraction, epe, d1 }
                })
                .collect(),
            auc_epe: by_sigma.area(|(epe, _)| epe),
            oracle_auc_epe: by_error.area(|(epe, _)| epe),
            auc_d1: by_sigma.area(|(_, d1)| d1),
            oracle_auc_d1: by_error.area(|(_, d1)| d1),
            within_1_sigma: within(1.0),
            within_2_sigma: within(2.0),
        })
    }
}

/// Prefix sums of error and D1 outliers over pixels ranked most certain first.
struct Curve {
    error: Vec<f64>,
    outliers: Vec<u64>,
}

impl Curve {
    fn ranked(
        pixels: &[(f32, bool, f32)],
        order: impl Fn(&(f32, bool, f32), &(f32, bool, f32)) -> std::cmp::Ordering,
    ) -> Curve {
        let mut sorted = pixels.to_vec();
        sorted.sort_by(order);
        let (mut error, mut outliers) = (vec![0.0], vec![0]);
        for (e, outlier, _) in sorted {
            error.push(error.last().unwrap() + f64::from(e));
            outliers.push(outliers.last().unwrap() + u64::from(outlier));
        }
        Curve { error, outliers }
    }

    /// (EPE, D1 %) over the first `fraction` of the ranked pixels (at least one).
    fn at(&self, fraction: f64) -> (f64, f64) {
        let n = self.error.len() - 1;
        let k = ((fraction * n as f64).round() as usize).clamp(1, n);
        (self.error[k] / k as f64, 100.0 * self.outliers[k] as f64 / k as f64)
    }

    /// Trapezoidal area of `value` against the fraction removed, 0 to 0.95.
    fn area(&self, value: impl Fn((f64, f64)) -> f64) -> f64 {
        let points: Vec<f64> = (0..=19).map(|i| value(self.at(1.0 - 0.05 * f64::from(i)))).collect();
        points.windows(2).map(|w| 0.05 * (w[0] + w[1]) / 2.0).sum()
    }
}

/// Metrics of one prediction.
pub fn evaluate(prediction: &DisparityMap, truth: &DisparityMap, maxdisp: f32) -> Metrics {
    let mut acc = Accumulator::default();
    acc.add(prediction, truth, maxdisp);
    acc.metrics()
}

// Error colours after the KITTI development kit: ten bins of the normalised
// error, from dark blue (far below the D1 threshold) to dark red (far above).
const ERROR_BINS: [(f32, [u8; 3]); 10] = [
    (0.0625, [49, 54, 149]),
    (0.125, [69, 117, 180]),
    (0.25, [116, 173, 209]),
    (0.5, [171, 217, 233]),
    (1.0, [224, 243, 248]),
    (2.0, [254, 224, 144]),
    (4.0, [253, 174, 97]),
    (8.0, [244, 109, 67]),
    (16.0, [215, 48, 39]),
    (f32::INFINITY, [165, 0, 38]),
];

/// Colour of one pixel's error: blue is good, red is bad. The error is
/// normalised as `min(e / 3, 20 e / truth)`, which reaches 1.0 exactly when the
/// pixel becomes a D1 outlier (error >= 3 px and >= 5 % of the truth).
pub fn error_color(prediction: f32, truth: f32) -> [u8; 3] {
    if !(truth.is_finite() && truth > 0.0) {
        return [0, 0, 0];
    }
    let e = (prediction - truth).abs();
    let normalised = (e / 3.0).min(20.0 * e / truth);
    let normalised = if normalised.is_nan() { f32::INFINITY } else { normalised };
    ERROR_BINS.iter().find(|(upper, _)| normalised < *upper).map_or([165, 0, 38], |(_, c)| *c)
}

/// KITTI-style error image; pixels without ground truth are black.
pub fn error_map(prediction: &DisparityMap, truth: &DisparityMap) -> RgbImage {
    let raw: Vec<u8> = prediction.values().iter().zip(truth.values()).flat_map(|(&p, &t)| error_color(p, t)).collect();
    RgbImage::from_raw(prediction.width(), prediction.height(), raw).expect("three bytes per pixel")
}

/// Ground truth kept only where a Middlebury-style mask is 255 (seen by both
/// views; 128 is occluded, 0 unknown): other pixels get no value, so they are
/// not scored.
pub fn apply_mask(truth: &DisparityMap, mask_png: &[u8]) -> Result<DisparityMap, String> {
    let mask = image::load_from_memory(mask_png).map_err(|e| format!("the mask: {e}"))?.to_luma8();
    if mask.dimensions() != (truth.width(), truth.height()) {
        let (w, h) = mask.dimensions();
        return Err(format!("the mask is {w}x{h} but the ground truth is {}x{}", truth.width(), truth.height()));
    }
    let values = truth.values().iter().zip(mask.as_raw()).map(|(&t, &m)| if m == 255 { t } else { f32::INFINITY });
    Ok(DisparityMap::new(truth.width(), truth.height(), values.collect()).expect("one value per pixel"))
}

/// Why ground truth could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GroundTruthError {
    #[error("{0}")]
    Pfm(#[from] pfm::PfmError),
    #[error("{0}")]
    Kitti(#[from] kitti::KittiError),
    #[error("not a PFM or PNG disparity file")]
    UnknownFormat,
    #[error("an 8-bit ground-truth PNG needs its scale (disparity = value / scale); none was given")]
    MissingScale,
    #[error("unsupported ground-truth PNG: {0}")]
    BadPng(String),
}

/// Reads ground truth from bytes, telling the kinds apart by content: PFM,
/// 16-bit PNG (KITTI convention) or 8-bit PNG (needs `scale8`). PNG headers are
/// checked against `max_pixels` before decoding; a PFM cannot declare more
/// pixels than its bytes hold.
pub fn decode_ground_truth(
    bytes: &[u8],
    scale8: Option<f32>,
    max_pixels: u64,
) -> Result<DisparityMap, GroundTruthError> {
    if bytes.starts_with(b"Pf") || bytes.starts_with(b"PF") {
        return Ok(pfm::decode(bytes)?);
    }
    if !bytes.starts_with(b"\x89PNG") {
        return Err(GroundTruthError::UnknownFormat);
    }
    crate::decode::probe(bytes, max_pixels).map_err(|e| GroundTruthError::BadPng(e.to_string()))?;
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| GroundTruthError::BadPng(e.to_string()))?;
    match image {
        image::DynamicImage::ImageLuma16(_) => Ok(kitti::decode_png16(bytes)?),
        image::DynamicImage::ImageLuma8(grey) => {
            let scale = scale8.ok_or(GroundTruthError::MissingScale)?;
            let (w, h) = grey.dimensions();
            let values = grey.into_raw().into_iter().map(|v| if v == 0 { f32::INFINITY } else { f32::from(v) / scale });
            Ok(DisparityMap::new(w, h, values.collect()).expect("one value per pixel"))
        }
        other => Err(GroundTruthError::BadPng(format!(
            "{:?} pixels; expected 16-bit grey (KITTI) or 8-bit grey with a scale",
            other.color()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(values: &[f32]) -> DisparityMap {
        DisparityMap::new(values.len() as u32, 1, values.to_vec()).unwrap()
    }

    #[test]
    fn sparsification_ranks_by_deviation_and_the_oracle_by_error() {
        // Ten pixels, truth 10 px; errors 0..9 px. Deviations rank them exactly
        // backwards from their errors in `wrong`, exactly right in `right`.
        let truth = map(&[10.0; 10]);
        let errors: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let pred = map(&errors.iter().map(|e| 10.0 + e).collect::<Vec<_>>());
        let right = map(&errors.iter().map(|e| e / 2.0 + 0.1).collect::<Vec<_>>());
        let wrong = map(&errors.iter().map(|e| 10.0 - e).collect::<Vec<_>>());
        let figures = |sigma: &DisparityMap| {
            let mut pixels = ScoredPixels::default();
            pixels.add(&pred, sigma, &truth, 192.0);
            pixels.sparsification().unwrap()
        };
        let good = figures(&right);
        // All pixels: EPE 4.5, D1 (error > 3 and > 0.5): 6 of 10.
        assert_eq!(good.kept[0], KeptMetrics { fraction: 1.0, epe: 4.5, d1: 60.0 });
        // The most certain 80 %: errors 0..7, EPE 3.5, outliers 4..7.
        assert_eq!(good.kept[2], KeptMetrics { fraction: 0.8, epe: 3.5, d1: 50.0 });
        // 50 %: errors 0..4: EPE 2, one outlier (4).
        assert_eq!(good.kept[3], KeptMetrics { fraction: 0.5, epe: 2.0, d1: 20.0 });
        // A perfect ranking is the oracle; a reversed one is worse than both.
        assert!((good.auc_epe - good.oracle_auc_epe).abs() < 1e-12);
        let bad = figures(&wrong);
        assert_eq!(bad.kept[3], KeptMetrics { fraction: 0.5, epe: 7.0, d1: 100.0 });
        assert!(bad.auc_epe > good.auc_epe && bad.auc_d1 > good.auc_d1);
        assert_eq!(bad.oracle_auc_epe, good.oracle_auc_epe);
        // error <= sigma: e <= e/2 + 0.1 holds for e = 0 only; <= 2 sigma: e <= e + 0.2, always.
        assert!((good.within_1_sigma - 10.0).abs() < 1e-9);
        assert!((good.within_2_sigma - 100.0).abs() < 1e-9);
    }

    #[test]
    fn sparsification_scores_the_same_pixels_and_pools_pairs() {
        // No truth (0), beyond maxdisp (200) and a NaN deviation (ranked least certain).
        let truth = map(&[0.0, 200.0, 10.0, 10.0]);
        let pred = map(&[5.0, 5.0, 10.0, 20.0]);
        let sigma = map(&[0.1, 0.1, f32::NAN, 0.5]);
        let mut one = ScoredPixels::default();
        one.add(&pred, &sigma, &truth, 192.0);
        assert_eq!(one.len(), 2);
        let figures = one.sparsification().unwrap();
        // Most certain half: the 10 px error (sigma 0.5), not the NaN's exact pixel.
        assert_eq!(figures.kept[3].epe, 10.0);
        let mut pooled = one.clone();
        pooled.extend(&one);
        assert_eq!(pooled.len(), 4);
        assert!(ScoredPixels::default().sparsification().is_none());
    }

    #[test]
    fn metrics_follow_the_benchmark_definitions() {
        // Truth 10 px everywhere; errors 0.5, 1.5, 2.5, 3.5 and 0.
        let truth = map(&[10.0, 10.0, 10.0, 10.0, 10.0]);
        let pred = map(&[10.5, 11.5, 7.5, 13.5, 10.0]);
        let m = evaluate(&pred, &truth, 192.0);
        assert!((m.epe - 8.0 / 5.0).abs() < 1e-9);
        assert_eq!(m.valid_pixels, 5);
        assert!((m.bad1 - 60.0).abs() < 1e-9); // 1.5, 2.5, 3.5
        assert!((m.bad2 - 40.0).abs() < 1e-9); // 2.5, 3.5
        assert!((m.bad3 - 20.0).abs() < 1e-9); // 3.5
        assert!((m.d1 - 20.0).abs() < 1e-9); // 3.5 > 3 and > 0.5
    }

    #[test]
    fn d1_needs_both_three_pixels_and_five_percent() {
        // Truth 100: an error of 4 px is > 3 px but < 5 % (5 px): not a D1 outlier.
        let m = evaluate(&map(&[104.0, 106.0]), &map(&[100.0, 100.0]), 192.0);
        assert!((m.d1 - 50.0).abs() < 1e-9);
        assert!((m.bad3 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn invalid_and_out_of_range_truth_is_skipped_and_counted() {
        let truth = map(&[f32::INFINITY, 0.0, 200.0, 192.0, f32::NAN, 5.0]);
        let pred = map(&[1.0, 1.0, 1.0, 1.0, 1.0, 6.0]);
        let m = evaluate(&pred, &truth, 192.0);
        assert_eq!((m.valid_pixels, m.excluded_pixels), (1, 2));
        assert!((m.epe - 1.0).abs() < 1e-9);
    }

    #[test]
    fn accumulators_pool_pixels_not_pairs() {
        let mut a = Accumulator::default();
        a.add(&map(&[1.0]), &map(&[2.0]), 192.0); // one pixel, error 1
        let mut b = Accumulator::default();
        b.add(&map(&[5.0, 5.0, 5.0]), &map(&[5.0, 5.0, 5.0]), 192.0); // three pixels, error 0
        a.merge(&b);
        let m = a.metrics();
        assert_eq!(m.valid_pixels, 4);
        assert!((m.epe - 0.25).abs() < 1e-9);
    }

    #[test]
    fn error_colours_run_from_blue_to_red() {
        assert_eq!(error_color(10.0, 10.0), [49, 54, 149]);
        assert_eq!(error_color(10.0, f32::INFINITY), [0, 0, 0]);
        // 3 px on a 100 px truth is only 3 %: normalised min(1.0, 0.6) = 0.6, not an outlier.
        assert_eq!(error_color(103.0, 100.0), [224, 243, 248]);
        assert_eq!(error_color(60.0, 10.0), [165, 0, 38]);
        assert_eq!(error_color(f32::NAN, 10.0), [165, 0, 38]);
        let image = error_map(&map(&[10.0, 0.0]), &map(&[10.0, 0.0]));
        assert_eq!(image.get_pixel(1, 0).0, [0, 0, 0]);
    }

    #[test]
    fn ground_truth_kinds_are_told_apart_by_content() {
        let m = map(&[1.5, f32::INFINITY]);
        assert_eq!(decode_ground_truth(&pfm::encode(&m), None, 100).unwrap(), m);
        let from_png16 = decode_ground_truth(&kitti::encode_png16(&m), None, 100).unwrap();
        assert_eq!(from_png16.values(), &[1.5, f32::INFINITY]);
        let mut png8 = std::io::Cursor::new(Vec::new());
        image::GrayImage::from_raw(2, 1, vec![12, 0]).unwrap().write_to(&mut png8, image::ImageFormat::Png).unwrap();
        assert!(matches!(decode_ground_truth(png8.get_ref(), None, 100), Err(GroundTruthError::MissingScale)));
        assert_eq!(decode_ground_truth(png8.get_ref(), Some(4.0), 100).unwrap().values(), &[3.0, f32::INFINITY]);
        assert!(matches!(decode_ground_truth(b"GIF89a", None, 100), Err(GroundTruthError::UnknownFormat)));
        // A PNG over the pixel limit is refused from its header.
        assert!(matches!(decode_ground_truth(png8.get_ref(), Some(4.0), 1), Err(GroundTruthError::BadPng(_))));
    }

    #[test]
    fn a_mask_keeps_only_pixels_seen_by_both_views() {
        let truth = DisparityMap::new(3, 1, vec![1.0, 2.0, 3.0]).unwrap();
        let mask = image::GrayImage::from_raw(3, 1, vec![255, 128, 0]).unwrap();
        let mut png = std::io::Cursor::new(Vec::new());
        mask.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let kept = apply_mask(&truth, png.get_ref()).unwrap();
        assert_eq!(kept.values(), &[1.0, f32::INFINITY, f32::INFINITY]);
        let wide = DisparityMap::new(4, 1, vec![1.0; 4]).unwrap();
        assert!(apply_mask(&wide, png.get_ref()).unwrap_err().contains("3x1"));
    }
}
