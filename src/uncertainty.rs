//! The per-pixel standard deviation of the disparity: summary figures and
//! masking the pixels the network is unsure of.
//!
//! PSMNet's last layer is a probability distribution over disparities; the
//! disparity is its mean and the deviation its spread (`forward_with_uncertainty`
//! of the exported model). A wide spread marks ambiguous pixels (textureless,
//! occluded, repetitive), which are where the large errors are.

use serde::Serialize;

use crate::disparity::DisparityMap;

/// Mean, median and 90th percentile of a deviation map, px (finite values only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct UncertaintyStats {
    pub mean: f32,
    pub median: f32,
    pub p90: f32,
}

/// The summary of `sigma`; zeros for a map without a finite value.
pub fn stats(sigma: &DisparityMap) -> UncertaintyStats {
    stats_of(sigma.values())
}

/// The summary of any deviations (px, or a depth's units), over the finite ones.
pub fn stats_of(values: &[f32]) -> UncertaintyStats {
    let mut values: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return UncertaintyStats { mean: 0.0, median: 0.0, p90: 0.0 };
    }
    let mean = (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64) as f32;
    let (median_at, p90_at) = (rank(values.len(), 0.5), rank(values.len(), 0.9));
    let (_, &mut p90, _) = values.select_nth_unstable_by(p90_at, f32::total_cmp);
    let (_, &mut median, _) = values.select_nth_unstable_by(median_at, f32::total_cmp);
    UncertaintyStats { mean, median, p90 }
}

/// The `q` quantile (nearest rank) of the finite values of `sigma`; 0 without any.
pub fn quantile(sigma: &DisparityMap, q: f64) -> f32 {
    let mut values: Vec<f32> = sigma.values().iter().copied().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return 0.0;
    }
    let at = rank(values.len(), q);
    *values.select_nth_unstable_by(at, f32::total_cmp).1
}

/// Index of the `q` quantile among `len` sorted values (nearest rank).
fn rank(len: usize, q: f64) -> usize {
    ((q.clamp(0.0, 1.0) * (len - 1) as f64).round() as usize).min(len - 1)
}

/// `disparity` with every pixel whose deviation is above `max_sigma` (or not a
/// number) marked as having no value (+inf, which every encoder writes as its
/// own "no value": 0 in KITTI PNGs, +inf in PFM, left out of depth and point
/// clouds), and how many pixels that marked.
pub fn mask(disparity: &DisparityMap, sigma: &DisparityMap, max_sigma: f32) -> (DisparityMap, u64) {
    assert_eq!((disparity.width(), disparity.height()), (sigma.width(), sigma.height()), "maps differ in size");
    let mut masked = 0;
    let values = disparity
        .values()
        .iter()
        .zip(sigma.values())
        .map(|(&d, &s)| {
            if s <= max_sigma {
                d
            } else {
                masked += 1;
                f32::INFINITY
            }
        })
        .collect();
    (DisparityMap::new(disparity.width(), disparity.height(), values).expect("same size"), masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[f32]) -> DisparityMap {
        DisparityMap::new(values.len() as u32, 1, values.to_vec()).unwrap()
    }

    #[test]
    fn stats_skip_values_that_are_not_finite() {
        let sigma = row(&[0.5, 1.0, 2.0, 4.0, f32::NAN, f32::INFINITY, 0.25, 0.75, 3.0, 1.5, 10.0]);
        let s = stats(&sigma);
        // Finite: 0.25 0.5 0.75 1 1.5 2 3 4 10 (9 values).
        assert!((s.mean - 23.0 / 9.0).abs() < 1e-6);
        assert_eq!(s.median, 1.5);
        assert_eq!(s.p90, 4.0); // rank round(0.9 * 8) = 7
        assert_eq!(stats(&row(&[f32::NAN])), UncertaintyStats { mean: 0.0, median: 0.0, p90: 0.0 });
        assert_eq!(quantile(&sigma, 0.99), 10.0);
        assert_eq!(quantile(&sigma, 0.0), 0.25);
        assert_eq!(quantile(&row(&[f32::INFINITY]), 0.5), 0.0);
    }

    #[test]
    fn masking_marks_uncertain_pixels_as_without_value() {
        let disparity = row(&[10.0, 20.0, 30.0, 40.0]);
        let sigma = row(&[0.5, 1.0, 1.01, f32::NAN]);
        let (masked, count) = mask(&disparity, &sigma, 1.0);
        assert_eq!(count, 2);
        assert_eq!(masked.values(), &[10.0, 20.0, f32::INFINITY, f32::INFINITY]);
        // The encoders' "no value": 0 in the KITTI PNG, +inf in the PFM.
        let png = crate::codec::kitti::decode_png16(&crate::codec::kitti::encode_png16(&masked)).unwrap();
        assert_eq!(png.values()[2], f32::INFINITY);
        assert_eq!(png.values()[0], 10.0);
    }
}
