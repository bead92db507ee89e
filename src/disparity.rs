//! The disparity map: what the engine produces and every encoder consumes.

use serde::Serialize;

/// Disparity of the left image in pixels, row-major, top row first.
///
/// A positive value `d` at `(x, y)` means the scene point seen at `(x, y)` in the
/// left image appears at `(x - d, y)` in the right image.
#[derive(Debug, Clone, PartialEq)]
pub struct DisparityMap {
    width: u32,
    height: u32,
    values: Vec<f32>,
}

/// Summary statistics of a map, over its finite values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct DisparityStats {
    pub min: f32,
    pub max: f32,
    pub mean: f32,
}

impl DisparityMap {
    /// Wraps `values` (length `width * height`); `None` if the length disagrees.
    pub fn new(width: u32, height: u32, values: Vec<f32>) -> Option<Self> {
        (values.len() == width as usize * height as usize).then_some(Self { width, height, values })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Value at column `x`, row `y` (top row is 0).
    pub fn get(&self, x: u32, y: u32) -> f32 {
        self.values[y as usize * self.width as usize + x as usize]
    }

    /// Min, max and mean over finite values; all zero for a map with none.
    /// The map resampled to `width` x `height` (bilinear, about pixel centres) with every
    /// value multiplied by the width ratio: a disparity of a downscaled pair in pixels of
    /// the full-size images, to score against a full-size ground truth.
    pub fn upscaled(&self, width: u32, height: u32) -> DisparityMap {
        let (sx, sy) = (self.width as f64 / width as f64, self.height as f64 / height as f64);
        let gain = (width as f64 / self.width as f64) as f32;
        let source = |position: f64, scale: f64, size: u32| {
            let p = ((position + 0.5) * scale - 0.5).clamp(0.0, f64::from(size - 1));
            let low = p.floor() as u32;
            (low, (low + 1).min(size - 1), (p - f64::from(low)) as f32)
        };
        let mut values = Vec::with_capacity(width as usize * height as usize);
        for y in 0..height {
            let (y0, y1, fy) = source(f64::from(y), sy, self.height);
            for x in 0..width {
                let (x0, x1, fx) = source(f64::from(x), sx, self.width);
                let top = self.get(x0, y0) * (1.0 - fx) + self.get(x1, y0) * fx;
                let bottom = self.get(x0, y1) * (1.0 - fx) + self.get(x1, y1) * fx;
                values.push((top * (1.0 - fy) + bottom * fy) * gain);
            }
        }
        DisparityMap { width, height, values }
    }

    pub fn stats(&self) -> DisparityStats {
        let mut min = f32::INFINITY;
        let mut max = f32::NEG_INFINITY;
        let mut sum = 0.0f64;
        let mut count = 0usize;
        for &v in self.values.iter().filter(|v| v.is_finite()) {
            min = min.min(v);
            max = max.max(v);
            sum += f64::from(v);
            count += 1;
        }
        if count == 0 {
            return DisparityStats { min: 0.0, max: 0.0, mean: 0.0 };
        }
        DisparityStats { min, max, mean: (sum / count as f64) as f32 }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_upscaled_map_is_in_full_size_pixels() {
        let half = DisparityMap::new(2, 1, vec![10.0, 20.0]).unwrap();
        let full = half.upscaled(4, 2);
        assert_eq!((full.width(), full.height()), (4, 2));
        // Values double (pixels of the wider image); centres interpolate, edges clamp.
        assert_eq!(full.values()[..4], [20.0, 25.0, 35.0, 40.0]);
        assert_eq!(full.values()[4..], full.values()[..4]);
    }

    use super::*;

    #[test]
    fn rejects_wrong_length() {
        assert!(DisparityMap::new(3, 2, vec![0.0; 5]).is_none());
        assert!(DisparityMap::new(3, 2, vec![0.0; 6]).is_some());
    }

    #[test]
    fn stats_ignore_non_finite_values() {
        let map = DisparityMap::new(2, 2, vec![1.0, f32::INFINITY, 3.0, f32::NAN]).unwrap();
        let stats = map.stats();
        assert_eq!((stats.min, stats.max, stats.mean), (1.0, 3.0, 2.0));
        assert_eq!(map.get(0, 1), 3.0);
    }

    #[test]
    fn stats_of_empty_map_are_zero() {
        let map = DisparityMap::new(0, 0, vec![]).unwrap();
        assert_eq!(map.stats(), DisparityStats { min: 0.0, max: 0.0, mean: 0.0 });
    }
}
