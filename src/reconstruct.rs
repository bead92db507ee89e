//! From disparity to metric depth and a coloured point cloud, and their files
//! (float32 PFM, 16-bit PNG in mm, binary PLY).
//!
//! Depth is `Z = fx * B / (d + doffs)` in the calibration's units, computed in
//! the rectified left camera. A pixel gets no depth when:
//! - its disparity is not finite or `d + doffs <= 0` (**invalid**);
//! - its match `x - d` falls outside the right image (**out of view**: only the
//!   left camera saw it, the network's value there is an extrapolation);
//! - it is **occluded** in the right view: a nearer surface (a disparity more
//!   than 1 px larger) lands on the same right-image column, so what the right
//!   camera saw there was something else (a z-buffer of the right image, per row);
//! - it lies **beyond the maximum depth** asked for;
//! - its disparity was masked as **too uncertain** (`max_uncertainty`; marked
//!   after the fact by [`DepthMap::mark_uncertain`]).
//!
//! Depth uncertainty is the disparity's standard deviation carried through
//! `Z = f B / (d + doffs)` to first order: `|dZ/dd| = f B / (d + doffs)^2 =
//! Z^2 / (f B)`, so `sigma_Z = Z^2 / (f B) * sigma_d`. It assumes an exact
//! calibration (f, B and doffs carry no error of their own) and a deviation
//! small beside `d + doffs`: the true spread of `Z` is skewed (wider on the far
//! side), so for far points, where `sigma_d` is a fair part of `d`, the figure is
//! a lower bound.
//!
//! Point clouds are in the original left camera's frame (x right, y down, z
//! forward): the rectification rotation is undone, so points from a rectified
//! and an unrectified run of the same rig line up.

use image::Rgb32FImage;
use serde::Serialize;

use crate::codec::{colormap, pfm, striped_png, PixelKind};
use crate::disparity::DisparityMap;
use crate::geometry::{self, Mat3};
use crate::rectify::StereoCamera;

/// Why a pixel has no depth (or that it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelStatus {
    Valid,
    Invalid,
    OutOfView,
    Occluded,
    TooFar,
    /// Its disparity's deviation was above the limit asked for.
    Uncertain,
}

/// Depth of the (rectified) left image, in `units`; excluded pixels hold +inf.
#[derive(Debug, Clone)]
pub struct DepthMap {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f32>,
    pub status: Vec<PixelStatus>,
    pub camera: StereoCamera,
}

/// What a client sees of a depth map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct DepthStats {
    pub units: &'static str,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub median: f64,
    /// Pixels with a depth (and so points in the cloud).
    pub valid_pixels: usize,
    pub invalid_pixels: usize,
    pub out_of_view_pixels: usize,
    pub occluded_pixels: usize,
    pub beyond_max_depth_pixels: usize,
    /// Pixels left out because their disparity's deviation was above `max_uncertainty`.
    pub too_uncertain_pixels: usize,
    pub max_depth: Option<f64>,
}

/// How much nearer (in disparity) a surface must be to hide another, pixels;
/// below this, differences are the network's noise, not occlusion.
const OCCLUSION_TOLERANCE_PX: f32 = 1.0;

/// Depth from `disparity` for `camera`, leaving out invalid, out-of-view,
/// occluded and (with `max_depth`) too distant pixels.
pub fn depth_map(disparity: &DisparityMap, camera: &StereoCamera, max_depth: Option<f64>) -> DepthMap {
    let (w, h) = (disparity.width() as usize, disparity.height() as usize);
    let mut values = vec![f32::INFINITY; w * h];
    let mut status = vec![PixelStatus::Invalid; w * h];
    // Per row, a z-buffer of the right image: the largest disparity (nearest
    // surface) that lands on each right-image column.
    let mut nearest = vec![f32::NEG_INFINITY; w];
    for y in 0..h {
        let row = &disparity.values()[y * w..(y + 1) * w];
        let column = |x: usize, d: f32| -> Option<usize> {
            let matched = (x as f32 - d).round();
            (matched >= 0.0 && (matched as usize) < w).then_some(matched as usize)
        };
        nearest.fill(f32::NEG_INFINITY);
        for (x, &d) in row.iter().enumerate() {
            if camera.depth(f64::from(d)).is_some() {
                if let Some(c) = column(x, d) {
                    nearest[c] = nearest[c].max(d);
                }
            }
        }
        for (x, &d) in row.iter().enumerate() {
            let i = y * w + x;
            let Some(z) = camera.depth(f64::from(d)) else {
                status[i] = PixelStatus::Invalid;
                continue;
            };
            status[i] = match column(x, d) {
                None => PixelStatus::OutOfView,
                Some(c) if d < nearest[c] - OCCLUSION_TOLERANCE_PX => PixelStatus::Occluded,
                Some(_) if max_depth.is_some_and(|m| z > m) => PixelStatus::TooFar,
                Some(_) => {
                    values[i] = z as f32;
                    PixelStatus::Valid
                }
            };
        }
    }
    DepthMap { width: w as u32, height: h as u32, values, status, camera: *camera }
}

impl DepthMap {
    pub fn stats(&self, max_depth: Option<f64>) -> DepthStats {
        let mut valid: Vec<f32> = self.values.iter().copied().filter(|v| v.is_finite()).collect();
        valid.sort_by(f32::total_cmp);
        let count = |s: PixelStatus| self.status.iter().filter(|x| **x == s).count();
        let (min, max, mean, median) = if valid.is_empty() {
            (0.0, 0.0, 0.0, 0.0)
        } else {
            let sum: f64 = valid.iter().map(|v| f64::from(*v)).sum();
            (
                f64::from(valid[0]),
                f64::from(valid[valid.len() - 1]),
                sum / valid.len() as f64,
                f64::from(valid[valid.len() / 2]),
            )
        };
        DepthStats {
            units: self.camera.units.symbol(),
            min,
            max,
            mean,
            median,
            valid_pixels: valid.len(),
            invalid_pixels: count(PixelStatus::Invalid),
            out_of_view_pixels: count(PixelStatus::OutOfView),
            occluded_pixels: count(PixelStatus::Occluded),
            beyond_max_depth_pixels: count(PixelStatus::TooFar),
            too_uncertain_pixels: count(PixelStatus::Uncertain),
            max_depth,
        }
    }

    /// Says which pixels have no depth because their disparity was masked as
    /// too uncertain (deviation `sigma` above `max_sigma`, or not a number):
    /// masking turns them into "no value", which [`depth_map`] calls invalid.
    pub fn mark_uncertain(&mut self, sigma: &DisparityMap, max_sigma: f32) {
        assert_eq!(sigma.values().len(), self.status.len(), "maps differ in size");
        for (status, &s) in self.status.iter_mut().zip(sigma.values()) {
            if *status == PixelStatus::Invalid && (s > max_sigma || s.is_nan()) {
                *status = PixelStatus::Uncertain;
            }
        }
    }

    /// Standard deviation of each depth, `Z^2 / (f B) * sigma_d`, in the
    /// calibration's units (see the module's note); +inf where there is no depth.
    pub fn uncertainty(&self, sigma: &DisparityMap) -> Vec<f32> {
        assert_eq!(sigma.values().len(), self.values.len(), "maps differ in size");
        let per_px = 1.0 / (self.camera.fx * self.camera.baseline);
        self.values
            .iter()
            .zip(sigma.values())
            .map(|(&z, &s)| {
                if z.is_finite() && s.is_finite() {
                    (f64::from(z) * f64::from(z) * per_px * f64::from(s)) as f32
                } else {
                    f32::INFINITY
                }
            })
            .collect()
    }

    /// float32 PFM in the calibration's units, +inf where there is no depth.
    pub fn to_pfm(&self) -> Vec<u8> {
        pfm::encode_values(self.width, self.height, &self.values)
    }

    /// 16-bit PNG of depth in millimetres (0 = no depth; beyond 65.535 m is
    /// left out rather than clipped, since a clipped value would be wrong).
    pub fn to_png16_mm(&self) -> Vec<u8> {
        let scale = self.camera.units.in_mm();
        let millimetres = |z: f32| {
            let mm = (f64::from(z) * scale).round();
            if z.is_finite() && (1.0..=65535.0).contains(&mm) {
                mm as u16
            } else {
                0
            }
        };
        let width = self.width as usize;
        striped_png::encode_rows(self.width, self.height, PixelKind::Gray16, None, |y, row| {
            for (out, &z) in row.chunks_exact_mut(2).zip(&self.values[y * width..(y + 1) * width]) {
                out.copy_from_slice(&millimetres(z).to_be_bytes());
            }
        })
    }

    /// Colour rendering, near red and far blue (turbo), black where there is no
    /// depth; scaled from the nearest to the farthest valid depth.
    pub fn to_color_png(&self) -> Vec<u8> {
        // Only the range is needed: no sort for the median, as stats() does.
        let (min, max) = self
            .values
            .iter()
            .filter(|z| z.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &z| (lo.min(f64::from(z)), hi.max(f64::from(z))));
        let span = max - min;
        colormap::turbo_png(self.width, self.height, &self.values, |z| {
            if span > 0.0 {
                (max - f64::from(z)) / span
            } else {
                0.5
            }
        })
    }

    /// Coloured points of every pixel with a depth, in the original left camera's
    /// frame: `to_left` is the rotation from the rectified frame back (R1ᵀ).
    pub fn point_cloud(&self, colours: &Rgb32FImage, to_left: &Mat3) -> Vec<Point> {
        let mut points = Vec::with_capacity(self.values.len());
        for y in 0..self.height {
            for x in 0..self.width {
                let z = self.values[(y * self.width + x) as usize];
                if !z.is_finite() {
                    continue;
                }
                let rectified = self.camera.point(f64::from(x), f64::from(y), f64::from(z));
                let p = geometry::mul_vec(to_left, &rectified);
                let c = colours.get_pixel(x, y).0;
                points.push(Point {
                    position: p.map(|v| v as f32),
                    colour: c.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8),
                });
            }
        }
        points
    }

    /// Per point of [`DepthMap::point_cloud`] (same order: pixels with a depth,
    /// row by row), the disparity's deviation (px) and the depth's (units).
    pub fn point_uncertainties(&self, sigma: &DisparityMap) -> Vec<PointUncertainty> {
        let depth_sigma = self.uncertainty(sigma);
        self.values
            .iter()
            .zip(sigma.values().iter().zip(depth_sigma))
            .filter(|(z, _)| z.is_finite())
            .map(|(_, (&disparity, depth))| PointUncertainty { disparity, depth })
            .collect()
    }
}

/// How far to trust one point: standard deviations of its disparity (px) and
/// of its depth (the calibration's units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointUncertainty {
    pub disparity: f32,
    pub depth: f32,
}

/// One point of the cloud.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub position: [f32; 3],
    pub colour: [u8; 3],
}

/// Binary little-endian PLY (x y z float, red green blue uchar), which
/// MeshLab, CloudCompare, Open3D and plyfile read.
pub fn encode_ply(points: &[Point], units: &str) -> Vec<u8> {
    encode_ply_with_uncertainty(points, None, units)
}

/// [`encode_ply`], and with `uncertainty` (one per point) two more float
/// properties per vertex, `sigma_disparity` (px) and `sigma_depth` (units),
/// which CloudCompare shows as scalar fields and plyfile/Open3D's tensor API read.
pub fn encode_ply_with_uncertainty(points: &[Point], uncertainty: Option<&[PointUncertainty]>, units: &str) -> Vec<u8> {
    if let Some(u) = uncertainty {
        assert_eq!(u.len(), points.len(), "one uncertainty per point");
    }
    let (note, extra) = if uncertainty.is_some() {
        (
            "comment sigma_disparity: standard deviation of the disparity, px; sigma_depth: of the depth, units of x y z\n",
            "property float sigma_disparity\nproperty float sigma_depth\n",
        )
    } else {
        ("", "")
    };
    let header = format!(
        "ply\nformat binary_little_endian 1.0\ncomment stereo-recon PSMNet reconstruction\ncomment units {units}; left camera frame: x right, y down, z forward\n{note}element vertex {}\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n{extra}end_header\n",
        points.len()
    );
    let record = if uncertainty.is_some() { 23 } else { 15 };
    let mut out = Vec::with_capacity(header.len() + points.len() * record);
    out.extend_from_slice(header.as_bytes());
    for (i, p) in points.iter().enumerate() {
        for v in p.position {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&p.colour);
        if let Some(u) = uncertainty {
            out.extend_from_slice(&u[i].disparity.to_le_bytes());
            out.extend_from_slice(&u[i].depth.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::Units;

    fn camera() -> StereoCamera {
        StereoCamera { fx: 100.0, fy: 100.0, cx: 4.5, cy: 1.5, doffs: 0.0, baseline: 0.5, units: Units::Metres }
    }

    #[test]
    fn depth_is_f_b_over_d_and_bad_pixels_are_left_out() {
        // One row: a far background at d = 2 with a near object (d = 5) at x = 6..8.
        let mut row = vec![2.0f32; 10];
        row[6] = 5.0;
        row[7] = 5.0;
        row[1] = f32::NAN;
        row[9] = -1.0;
        let map = DisparityMap::new(10, 1, row).unwrap();
        let depth = depth_map(&map, &camera(), None);
        use PixelStatus::*;
        // x=0 matches at -2, outside the right image. x=3 and 4 match at 1 and 2, where the right
        // camera sees the object (x=6, 7); x=5 matches at 3, beside the object: visible.
        assert_eq!(
            depth.status,
            vec![OutOfView, Invalid, Valid, Occluded, Occluded, Valid, Valid, Valid, Valid, Invalid]
        );
        assert_eq!(depth.values[2], 25.0); // 100 * 0.5 / 2
        assert_eq!(depth.values[6], 10.0);
        let limited = depth_map(&map, &camera(), Some(20.0));
        assert_eq!(limited.status[2], TooFar);
        let stats = limited.stats(Some(20.0));
        assert_eq!((stats.valid_pixels, stats.occluded_pixels, stats.beyond_max_depth_pixels), (2, 2, 3));
        assert_eq!((stats.min, stats.max, stats.units), (10.0, 10.0, "m"));
    }

    #[test]
    fn doffs_enters_the_depth() {
        let camera = StereoCamera { doffs: 10.0, ..camera() };
        let map = DisparityMap::new(50, 1, vec![40.0; 50]).unwrap();
        assert_eq!(depth_map(&map, &camera, None).values[45], 1.0); // 100 * 0.5 / (40 + 10)
    }

    #[test]
    fn png16_is_millimetres_and_pfm_keeps_floats() {
        let mut values = vec![f32::NAN; 60];
        values[55..58].copy_from_slice(&[50.0, 0.0, 0.0005]);
        let depth = depth_map(&DisparityMap::new(60, 1, values).unwrap(), &camera(), None);
        let png = image::load_from_memory(&depth.to_png16_mm()).unwrap().into_luma16();
        // 1 m = 1000 mm; no disparity = 0; 100 km (beyond 65.535 m) = 0.
        assert_eq!(&png.as_raw()[55..58], &[1000, 0, 0]);
        let back = pfm::decode(&depth.to_pfm()).unwrap();
        assert_eq!(back.values()[55], 1.0);
        assert!(back.values()[56].is_infinite());
    }

    #[test]
    fn points_are_back_projected_and_rotated_to_the_left_frame() {
        let map = DisparityMap::new(10, 3, vec![10.0; 30]).unwrap();
        let depth = depth_map(&map, &camera(), None);
        let colours = Rgb32FImage::from_pixel(10, 3, image::Rgb([1.0, 0.5, 0.0]));
        let points = depth.point_cloud(&colours, &geometry::IDENTITY);
        // Every column matches at x - 10 < 0: all out of the right view.
        assert!(points.is_empty());
        let map = DisparityMap::new(10, 3, vec![1.0; 30]).unwrap();
        let depth = depth_map(&map, &camera(), None);
        let points = depth.point_cloud(&colours, &geometry::IDENTITY);
        assert_eq!(points.len(), 27, "column 0 matches at -1, outside the right image");
        // Pixel (9, 2): Z = 50, X = (9 - 4.5) * 50 / 100 = 2.25, Y = (2 - 1.5) * 50 / 100 = 0.25.
        let last = points.last().unwrap();
        assert_eq!(last.position, [2.25, 0.25, 50.0]);
        assert_eq!(last.colour, [255, 128, 0]);
        let turned = depth.point_cloud(&colours, &geometry::rodrigues(&[0.0, std::f64::consts::FRAC_PI_2, 0.0]));
        let p = turned.last().unwrap().position;
        assert!((p[0] - 50.0).abs() < 1e-4 && (p[2] + 2.25).abs() < 1e-4, "{p:?}");
    }

    #[test]
    fn depth_uncertainty_is_z_squared_over_f_b_times_sigma_and_masked_pixels_are_uncertain() {
        // d = 2 everywhere (Z = 25 m, f B = 50), with the last pixel masked (no value).
        let mut row = vec![2.0f32; 10];
        row[9] = f32::INFINITY;
        let sigma = DisparityMap::new(10, 1, vec![0.1; 9].into_iter().chain([5.0]).collect()).unwrap();
        let mut depth = depth_map(&DisparityMap::new(10, 1, row).unwrap(), &camera(), None);
        assert_eq!(depth.status[9], PixelStatus::Invalid);
        depth.mark_uncertain(&sigma, 1.0);
        assert_eq!(depth.status[9], PixelStatus::Uncertain);
        assert_eq!(depth.status[0], PixelStatus::OutOfView, "other reasons stay");
        assert_eq!(depth.stats(None).too_uncertain_pixels, 1);
        let sigma_z = depth.uncertainty(&sigma);
        // 25^2 / 50 * 0.1 = 1.25 m; no depth, no depth uncertainty.
        assert!((sigma_z[5] - 1.25).abs() < 1e-6, "{}", sigma_z[5]);
        assert!(sigma_z[0].is_infinite() && sigma_z[9].is_infinite());
        // Same as the derivative of Z(d) by finite differences.
        let z = |d: f64| camera().depth(d).unwrap();
        let slope = (z(2.0 - 1e-4) - z(2.0 + 1e-4)) / 2e-4;
        assert!((slope * 0.1 - 1.25).abs() < 1e-6);
        let per_point = depth.point_uncertainties(&sigma);
        assert_eq!(per_point.len(), depth.values.iter().filter(|z| z.is_finite()).count());
        assert_eq!(per_point[0], PointUncertainty { disparity: 0.1, depth: sigma_z[2] });
    }

    #[test]
    fn ply_with_uncertainty_adds_two_float_properties() {
        let points = [Point { position: [1.0, -2.0, 3.5], colour: [10, 20, 30] }; 2];
        let u = [PointUncertainty { disparity: 0.5, depth: 0.25 }, PointUncertainty { disparity: 2.0, depth: 4.0 }];
        let ply = encode_ply_with_uncertainty(&points, Some(&u), "m");
        let text = String::from_utf8_lossy(&ply);
        assert!(text.contains("property uchar blue\nproperty float sigma_disparity\nproperty float sigma_depth\n"));
        let body = &ply[text.find("end_header\n").unwrap() + 11..];
        assert_eq!(body.len(), 2 * 23);
        assert_eq!(&body[15..19], &0.5f32.to_le_bytes());
        assert_eq!(&body[23 + 19..46], &4.0f32.to_le_bytes());
        assert_eq!(encode_ply_with_uncertainty(&points, None, "m"), encode_ply(&points, "m"));
    }

    #[test]
    fn ply_header_and_records() {
        let points = [Point { position: [1.0, -2.0, 3.5], colour: [10, 20, 30] }; 2];
        let ply = encode_ply(&points, "m");
        let text = String::from_utf8_lossy(&ply);
        assert!(text.starts_with("ply\nformat binary_little_endian 1.0\n"));
        assert!(text.contains("element vertex 2\n"));
        let body = &ply[text.find("end_header\n").unwrap() + 11..];
        assert_eq!(body.len(), 2 * 15);
        assert_eq!(&body[0..4], &1.0f32.to_le_bytes());
        assert_eq!(&body[12..15], &[10, 20, 30]);
    }
}
