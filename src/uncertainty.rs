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
    summary_of(values).0
}

/// [`stats`] and the 99th percentile (the top of the deviation's colour
/// scale), from one pass over the map.
pub fn stats_and_p99(sigma: &DisparityMap) -> (UncertaintyStats, f32) {
    summary_of(sigma.values())
}

fn summary_of(values: &[f32]) -> (UncertaintyStats, f32) {
    match describe(values, &[0.5, 0.9, 0.99]) {
        None => (UncertaintyStats { mean: 0.0, median: 0.0, p90: 0.0 }, 0.0),
        Some((mean, q)) => (UncertaintyStats { mean, median: q[0], p90: q[1] }, q[2]),
    }
}

/// Index of the `q` quantile among `len` sorted values (nearest rank).
fn rank(len: usize, q: f64) -> usize {
    ((q.clamp(0.0, 1.0) * (len - 1) as f64).round() as usize).min(len - 1)
}

/// A float's bits made to sort as the float does (`total_cmp`'s order).
fn order_key(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// Mean and nearest-rank quantiles of the finite `values`, exactly, without
/// copying and sorting them: a histogram of the top 16 bits of each value's
/// [`order_key`] (sign, exponent and 7 bits of mantissa: buckets 1/128 of an
/// octave wide) finds the bucket each rank falls in, and a second pass selects
/// among the few values of those buckets. A KITTI-sized map: 3.0 + 1.5 ms
/// (copy and select for the statistics, then again for the 99th percentile)
/// became 1.9 ms for all four (`make bench-request`, `sigma_stats`). `None` without a
/// finite value.
fn describe(values: &[f32], quantiles: &[f64]) -> Option<(f32, Vec<f32>)> {
    const BUCKETS: usize = 1 << 16;
    let bucket = |v: f32| (order_key(v) >> 16) as usize;
    let mut counts = vec![0u32; BUCKETS];
    let (mut sum, mut n) = (0.0f64, 0usize);
    for &v in values.iter().filter(|v| v.is_finite()) {
        counts[bucket(v)] += 1;
        sum += f64::from(v);
        n += 1;
    }
    if n == 0 {
        return None;
    }
    // Values below each bucket, then for each quantile its bucket and rank in it.
    let mut below = Vec::with_capacity(BUCKETS);
    let mut total = 0usize;
    for &c in &counts {
        below.push(total);
        total += c as usize;
    }
    let wanted: Vec<(usize, usize)> = quantiles
        .iter()
        .map(|&q| {
            let r = rank(n, q);
            // The last bucket that starts at or below rank r holds it.
            let b = below.partition_point(|&start| start <= r) - 1;
            (b, r - below[b])
        })
        .collect();
    let mut members: Vec<(usize, Vec<f32>)> = Vec::new();
    for &(b, _) in &wanted {
        if !members.iter().any(|(m, _)| *m == b) {
            members.push((b, Vec::with_capacity(counts[b] as usize)));
        }
    }
    for &v in values.iter().filter(|v| v.is_finite()) {
        let b = bucket(v);
        if let Some((_, list)) = members.iter_mut().find(|(m, _)| *m == b) {
            list.push(v);
        }
    }
    let found = wanted
        .iter()
        .map(|&(b, r)| {
            let (_, list) = members.iter_mut().find(|(m, _)| *m == b).expect("collected");
            *list.select_nth_unstable_by(r, f32::total_cmp).1
        })
        .collect();
    Some(((sum / n as f64) as f32, found))
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
        assert_eq!(stats_and_p99(&sigma).1, 10.0);
        assert_eq!(describe(sigma.values(), &[0.0]).unwrap().1[0], 0.25);
        assert_eq!(stats_and_p99(&row(&[f32::INFINITY])).1, 0.0);
    }

    #[test]
    fn quantiles_from_the_histogram_equal_those_of_a_sort() {
        // A deterministic mix: deviations over several octaves, repeats, one bucket
        // holding many values, negatives, zeros and values that are not finite.
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut values: Vec<f32> = (0..50_000).map(|_| (next() % 1_000_000) as f32 / 1e4 * 0.37).collect();
        values.extend((0..5_000).map(|_| 0.5 + (next() % 100) as f32 * 1e-6));
        values.extend([0.0, -0.0, -3.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, 7.0, 7.0]);
        let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f32::total_cmp);
        for q in [0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let expected = sorted[rank(sorted.len(), q)];
            let (_, found) = describe(&values, &[q]).unwrap();
            assert_eq!(found[0].to_bits(), expected.to_bits(), "q = {q}");
        }
        let (mean, _) = describe(&values, &[0.5]).unwrap();
        let exact = sorted.iter().map(|&v| f64::from(v)).sum::<f64>() / sorted.len() as f64;
        assert!((f64::from(mean) - exact).abs() < 1e-4);
        let one = [2.5f32];
        assert_eq!(describe(&one, &[0.0, 0.5, 1.0]).unwrap().1, vec![2.5, 2.5, 2.5]);
        assert!(describe(&[f32::NAN], &[0.5]).is_none());
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
