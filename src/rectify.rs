//! Stereo rectification (Bouguet's method, as OpenCV's `stereoRectify` with
//! `CALIB_ZERO_DISPARITY` and `alpha = -1` computes it) and the resampling of
//! both images onto the rectified cameras (`initUndistortRectifyMap` + `remap`).
//!
//! After rectification both cameras share one focal length and principal point
//! and differ by a pure x translation, so a scene point appears on the same row
//! in both images: what PSMNet assumes. Bouguet splits the rotation between the
//! cameras in half (each turns by half of `R`, minimising reprojection change),
//! then turns both so the baseline lies along x.
//!
//! A calibration that is already rectified (see
//! [`Calibration::is_rectified`]) is used as it is: resampling would only blur.

use image::{Rgb, Rgb32FImage};
use serde::Serialize;

use crate::calibration::{Calibration, CalibrationError, Camera, Units};
use crate::geometry::{self, Mat3};

/// The rectified left camera, which is what depth and points are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub struct StereoCamera {
    /// Focal lengths in pixels (equal after Bouguet rectification).
    pub fx: f64,
    pub fy: f64,
    /// Left principal point, pixels.
    pub cx: f64,
    pub cy: f64,
    /// Right principal point's x minus the left's (Middlebury's `doffs`): depth is
    /// `fx * baseline / (d + doffs)`.
    pub doffs: f64,
    /// Distance between the camera centres, in `units` (positive).
    pub baseline: f64,
    pub units: Units,
}

impl StereoCamera {
    /// Depth of a disparity `d` (pixels), in `units`; `None` when `d + doffs` is not positive.
    pub fn depth(&self, d: f64) -> Option<f64> {
        let shifted = d + self.doffs;
        (shifted > 0.0 && d.is_finite()).then(|| self.fx * self.baseline / shifted)
    }

    /// The 3-D point (in the rectified left camera's frame) seen at pixel `(u, v)` at depth `z`.
    pub fn point(&self, u: f64, v: f64, z: f64) -> [f64; 3] {
        [(u - self.cx) * z / self.fx, (v - self.cy) * z / self.fy, z]
    }

    /// OpenCV's 4x4 reprojection matrix: `[x y z w]ᵀ = Q [u v d 1]ᵀ`, point = (x, y, z) / w.
    pub fn q_matrix(&self) -> [[f64; 4]; 4] {
        // With Tx = -baseline (the right camera sits at +x): Q[3][2] = -1/Tx and
        // Q[3][3] = (cx_left - cx_right)/Tx; fx = fy here or the y row scales by fx/fy.
        let tx = -self.baseline;
        [
            [1.0, 0.0, 0.0, -self.cx],
            [0.0, self.fx / self.fy, 0.0, -self.cy * self.fx / self.fy],
            [0.0, 0.0, 0.0, self.fx],
            [0.0, 0.0, -1.0 / tx, -self.doffs / tx],
        ]
    }
}

/// What rectification did: the rotations that turn each original camera into
/// its rectified one, the new projection matrices, and the rectified camera.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rectification {
    /// False when the calibration was already rectified and the images are used as they are.
    pub applied: bool,
    pub width: u32,
    pub height: u32,
    /// Rotation from the original left (right) camera frame to the rectified one.
    pub r_left: Mat3,
    pub r_right: Mat3,
    /// 3x4 projection matrices of the rectified cameras (OpenCV's P1, P2).
    pub p_left: [[f64; 4]; 3],
    pub p_right: [[f64; 4]; 3],
    /// 4x4 disparity-to-depth matrix (OpenCV's Q).
    pub q: [[f64; 4]; 4],
    pub camera: StereoCamera,
}

/// Normalised undistorted coordinates -> distorted (OpenCV's model:
/// radial k1 k2 k3 over k4 k5 k6, tangential p1 p2).
pub fn distort(camera: &Camera, x: f64, y: f64) -> (f64, f64) {
    let c = |i| camera.coefficient(i);
    let r2 = x * x + y * y;
    let radial = (1.0 + r2 * (c(0) + r2 * (c(1) + r2 * c(4)))) / (1.0 + r2 * (c(5) + r2 * (c(6) + r2 * c(7))));
    let xd = x * radial + 2.0 * c(2) * x * y + c(3) * (r2 + 2.0 * x * x);
    let yd = y * radial + c(2) * (r2 + 2.0 * y * y) + 2.0 * c(3) * x * y;
    (xd, yd)
}

/// Distorted normalised coordinates -> undistorted, by OpenCV's fixed-point
/// iteration (`iterations` rounds; OpenCV's `undistortPoints` does 5).
pub fn undistort(camera: &Camera, xd: f64, yd: f64, iterations: usize) -> (f64, f64) {
    let c = |i| camera.coefficient(i);
    let (mut x, mut y) = (xd, yd);
    for _ in 0..iterations {
        let r2 = x * x + y * y;
        let inverse_radial =
            (1.0 + r2 * (c(5) + r2 * (c(6) + r2 * c(7)))) / (1.0 + r2 * (c(0) + r2 * (c(1) + r2 * c(4))));
        let dx = 2.0 * c(2) * x * y + c(3) * (r2 + 2.0 * x * x);
        let dy = c(2) * (r2 + 2.0 * y * y) + 2.0 * c(3) * x * y;
        x = (xd - dx) * inverse_radial;
        y = (yd - dy) * inverse_radial;
    }
    (x, y)
}

/// Pixel -> normalised (distorted) coordinates through K⁻¹, skew included.
fn normalise(camera: &Camera, u: f64, v: f64) -> (f64, f64) {
    let k = &camera.k;
    let y = (v - k[1][2]) / k[1][1];
    let x = (u - k[0][2] - k[0][1] * y) / k[0][0];
    (x, y)
}

/// Bouguet rectification of `calibration` for `width` x `height` images.
pub fn stereo_rectify(calibration: &Calibration, width: u32, height: u32) -> Result<Rectification, CalibrationError> {
    calibration.check_size(width, height)?;
    if calibration.is_rectified() {
        return already_rectified(calibration, width, height);
    }
    // Half of R for each camera, in opposite senses, so both turn equally.
    let om = geometry::rodrigues_inverse(&calibration.r);
    let r_half = geometry::rodrigues(&geometry::scale(&om, -0.5));
    let t = geometry::mul_vec(&r_half, &calibration.t);
    if t[1].abs() > t[0].abs() {
        return Err(CalibrationError::Unsupported(
            "the cameras are above one another (vertical stereo); only side-by-side pairs are supported".into(),
        ));
    }
    // Turn both about the axis t x e_x so the baseline lies along x.
    let mut e = [0.0; 3];
    e[0] = if t[0] > 0.0 { 1.0 } else { -1.0 };
    let w = geometry::cross(&t, &e);
    let nw = geometry::norm(&w);
    let w = if nw > 0.0 { geometry::scale(&w, (t[0].abs() / geometry::norm(&t)).acos() / nw) } else { w };
    let w_r = geometry::rodrigues(&w);
    let r_left = geometry::mul(&w_r, &geometry::transpose(&r_half));
    let r_right = geometry::mul(&w_r, &r_half);
    let t_new = geometry::mul_vec(&r_right, &calibration.t);
    if t_new[0] >= 0.0 {
        return Err(swapped_cameras());
    }

    // One focal length for both: the mean of their fy (OpenCV 4's choice).
    let f = 0.5 * (calibration.left.fy() + calibration.right.fy());
    // Principal points: centre the rectified view of each image's corners, then
    // share one principal point (zero disparity at infinity).
    let (nx, ny) = (f64::from(width), f64::from(height));
    let mut centres = [(0.0, 0.0); 2];
    for (k, (camera, rotation)) in
        [(&calibration.left, &r_left), (&calibration.right, &r_right)].into_iter().enumerate()
    {
        let mut sum = (0.0, 0.0);
        for (u, v) in [(0.0, 0.0), (nx - 1.0, 0.0), (0.0, ny - 1.0), (nx - 1.0, ny - 1.0)] {
            let (xd, yd) = normalise(camera, u, v);
            let (x, y) = undistort(camera, xd, yd, 5);
            let p = geometry::mul_vec(rotation, &[x, y, 1.0]);
            sum.0 += f * p[0] / p[2];
            sum.1 += f * p[1] / p[2];
        }
        centres[k] = ((nx - 1.0) / 2.0 - sum.0 / 4.0, (ny - 1.0) / 2.0 - sum.1 / 4.0);
    }
    let (cx, cy) = (0.5 * (centres[0].0 + centres[1].0), 0.5 * (centres[0].1 + centres[1].1));
    let camera = StereoCamera { fx: f, fy: f, cx, cy, doffs: 0.0, baseline: -t_new[0], units: calibration.units };
    Ok(Rectification {
        applied: true,
        width,
        height,
        r_left,
        r_right,
        p_left: [[f, 0.0, cx, 0.0], [0.0, f, cy, 0.0], [0.0, 0.0, 1.0, 0.0]],
        p_right: [[f, 0.0, cx, f * t_new[0]], [0.0, f, cy, 0.0], [0.0, 0.0, 1.0, 0.0]],
        q: camera.q_matrix(),
        camera,
    })
}

/// The calibration's right camera sits to the left of its left camera.
fn swapped_cameras() -> CalibrationError {
    CalibrationError::Invalid(
        "the right camera is to the left of the left camera (T_x > 0): swap the images, or the calibration's cameras"
            .into(),
    )
}

fn already_rectified(c: &Calibration, width: u32, height: u32) -> Result<Rectification, CalibrationError> {
    if c.t[0] >= 0.0 {
        return Err(swapped_cameras());
    }
    let camera = StereoCamera {
        fx: c.left.fx(),
        fy: c.left.fy(),
        cx: c.left.cx(),
        cy: c.left.cy(),
        doffs: c.right.cx() - c.left.cx(),
        baseline: -c.t[0],
        units: c.units,
    };
    let p =
        |k: &Mat3, tx: f64| [[k[0][0], k[0][1], k[0][2], tx], [k[1][0], k[1][1], k[1][2], 0.0], [0.0, 0.0, 1.0, 0.0]];
    Ok(Rectification {
        applied: false,
        width,
        height,
        r_left: geometry::IDENTITY,
        r_right: geometry::IDENTITY,
        p_left: p(&c.left.k, 0.0),
        p_right: p(&c.right.k, c.right.fx() * c.t[0]),
        q: camera.q_matrix(),
        camera,
    })
}

/// For every rectified pixel, where to sample the original image.
pub struct RectifyMap {
    width: u32,
    height: u32,
    source: Vec<(f32, f32)>,
}

impl RectifyMap {
    /// The map of one camera: `rotation` (R1 or R2) and its new projection `p`.
    pub fn new(camera: &Camera, rotation: &Mat3, p: &[[f64; 4]; 3], width: u32, height: u32) -> RectifyMap {
        let back = geometry::transpose(rotation);
        let (f, cx, cy) = (p[0][0], p[0][2], p[1][2]);
        let k = &camera.k;
        let mut source = Vec::with_capacity(width as usize * height as usize);
        for v in 0..height {
            for u in 0..width {
                let ray = [(f64::from(u) - cx) / f, (f64::from(v) - cy) / p[1][1], 1.0];
                let q = geometry::mul_vec(&back, &ray);
                let (xd, yd) = distort(camera, q[0] / q[2], q[1] / q[2]);
                let su = k[0][0] * xd + k[0][1] * yd + k[0][2];
                let sv = k[1][1] * yd + k[1][2];
                source.push((su as f32, sv as f32));
            }
        }
        RectifyMap { width, height, source }
    }

    /// Where rectified pixel `(u, v)` comes from in the original image.
    pub fn source(&self, u: u32, v: u32) -> (f32, f32) {
        self.source[v as usize * self.width as usize + u as usize]
    }

    /// Resamples `image` (bilinear); pixels whose source lies outside are black.
    pub fn apply(&self, image: &Rgb32FImage) -> Rgb32FImage {
        let (w, h) = (image.width() as i64, image.height() as i64);
        let texel = |x: i64, y: i64| -> [f32; 3] {
            if x < 0 || y < 0 || x >= w || y >= h {
                [0.0; 3]
            } else {
                image.get_pixel(x as u32, y as u32).0
            }
        };
        Rgb32FImage::from_fn(self.width, self.height, |u, v| {
            let (sx, sy) = self.source(u, v);
            if !(sx > -1.0 && sy > -1.0 && sx < w as f32 && sy < h as f32) {
                return Rgb([0.0; 3]);
            }
            let (x0, y0) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (p00, p10, p01, p11) = (texel(x0, y0), texel(x0 + 1, y0), texel(x0, y0 + 1), texel(x0 + 1, y0 + 1));
            Rgb([0, 1, 2]
                .map(|c| (p00[c] * (1.0 - ax) + p10[c] * ax) * (1.0 - ay) + (p01[c] * (1.0 - ax) + p11[c] * ax) * ay))
        })
    }
}

/// Rectifies a pair: both images resampled when the calibration needs it.
pub fn rectify_pair(
    calibration: &Calibration,
    left: Rgb32FImage,
    right: Rgb32FImage,
) -> Result<(Rgb32FImage, Rgb32FImage, Rectification), CalibrationError> {
    let rectification = stereo_rectify(calibration, left.width(), left.height())?;
    if !rectification.applied {
        return Ok((left, right, rectification));
    }
    let (w, h) = (left.width(), left.height());
    let left_map = RectifyMap::new(&calibration.left, &rectification.r_left, &rectification.p_left, w, h);
    let right_map = RectifyMap::new(&calibration.right, &rectification.r_right, &rectification.p_right, w, h);
    Ok((left_map.apply(&left), right_map.apply(&right), rectification))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::tests::rig;

    #[test]
    fn matches_opencv_stereo_rectify() {
        // cv2.stereoRectify(K1, D1, K2, D2, (640, 480), R, T, flags=CALIB_ZERO_DISPARITY, alpha=-1),
        // OpenCV 5.0.0, for the rig above.
        let r1 = [
            [0.9999647248283932, -0.007815691907236815, 0.003076371058089703],
            [0.007821905521553813, 0.9999673823526585, -0.002012964178531907],
            [-0.003060538006263727, 0.002036956254640685, 0.9999932419353287],
        ];
        let r2 = [
            [0.9998696438423108, -0.00585207985526174, 0.01504820534210488],
            [0.005821594577145616, 0.9999809142676505, 0.002068849200236291],
            [-0.015060025206813654, -0.0019809749623883443, 0.9998846290342543],
        ];
        let rect = stereo_rectify(&rig(), 640, 480).unwrap();
        assert!(rect.applied);
        assert!(geometry::max_abs_diff(&rect.r_left, &r1) < 1e-12);
        assert!(geometry::max_abs_diff(&rect.r_right, &r2) < 1e-12);
        assert_eq!(rect.camera.fx, 613.125);
        // OpenCV averages the corners in float32: agreement to a few 1e-5 px.
        assert!((rect.camera.cx - 312.7575798034668).abs() < 1e-3, "{}", rect.camera.cx);
        assert!((rect.camera.cy - 239.89006423950195).abs() < 1e-3, "{}", rect.camera.cy);
        assert!((rect.p_right[0][3] - -36669.65511534463).abs() < 1e-6);
        assert!((rect.q[3][2] - 0.016720228157898174).abs() < 1e-12);
        // cv2.initUndistortRectifyMap(K1, D1, R1, P1, (640, 480), CV_32FC1) at four pixels.
        let map = RectifyMap::new(&rig().left, &rect.r_left, &rect.p_left, 640, 480);
        for ((u, v), (x, y)) in [
            ((0, 0), (26.971365, 24.83619)),
            ((320, 240), (323.61075, 242.7993)),
            ((639, 479), (616.77026, 459.29248)),
            ((100, 400), (112.71567, 398.41287)),
        ] {
            let (sx, sy) = map.source(u, v);
            assert!((sx - x).abs() < 2e-3 && (sy - y).abs() < 2e-3, "({u}, {v}): ({sx}, {sy}) vs ({x}, {y})");
        }
    }

    #[test]
    fn rectified_rows_agree_and_depth_comes_back() {
        let calibration = rig();
        let rect = stereo_rectify(&calibration, 640, 480).unwrap();
        let project = |camera: &Camera, rotation: &Mat3, p: &[[f64; 4]; 3], x: [f64; 3]| {
            // Original pixel (with distortion), then to the rectified image as undistortPoints(R, P) does.
            let (xd, yd) = distort(camera, x[0] / x[2], x[1] / x[2]);
            let (u, v) = (camera.fx() * xd + camera.cx(), camera.fy() * yd + camera.cy());
            let (xd, yd) = normalise(camera, u, v);
            let (xu, yu) = undistort(camera, xd, yd, 50);
            let q = geometry::mul_vec(rotation, &[xu, yu, 1.0]);
            (p[0][0] * q[0] / q[2] + p[0][2], p[1][1] * q[1] / q[2] + p[1][2])
        };
        for x in [[-300.0, -200.0, 1500.0], [0.0, 0.0, 800.0], [450.0, 300.0, 2500.0], [-100.0, 250.0, 600.0]] {
            let xr = geometry::mul_vec(&calibration.r, &x);
            let xr = [xr[0] + calibration.t[0], xr[1] + calibration.t[1], xr[2] + calibration.t[2]];
            let (ul, vl) = project(&calibration.left, &rect.r_left, &rect.p_left, x);
            let (ur, vr) = project(&calibration.right, &rect.r_right, &rect.p_right, xr);
            assert!((vl - vr).abs() < 1e-6, "rows {vl} vs {vr}");
            // Depth in the rectified left frame from the disparity.
            let z_rect = geometry::mul_vec(&rect.r_left, &x)[2];
            let z = rect.camera.depth(ul - ur).unwrap();
            assert!((z - z_rect).abs() < 1e-6 * z_rect, "depth {z} vs {z_rect}");
        }
    }

    #[test]
    fn an_already_rectified_pair_is_left_alone_with_its_doffs() {
        let mut c = crate::calibration::formats::read_middlebury(
            "cam0=[1000 0 400; 0 1000 300; 0 0 1]\ncam1=[1000 0 450; 0 1000 300; 0 0 1]\ndoffs=50\nbaseline=200\nwidth=800\nheight=600\n",
        )
        .unwrap();
        let rect = stereo_rectify(&c, 800, 600).unwrap();
        assert!(!rect.applied);
        assert_eq!(rect.camera.doffs, 50.0);
        // Z = f B / (d + doffs): 1000 * 200 / (150 + 50) = 1000 mm.
        assert_eq!(rect.camera.depth(150.0), Some(1000.0));
        assert_eq!(rect.camera.depth(-60.0), None);
        assert!(stereo_rectify(&c, 640, 480).unwrap_err().to_string().contains("800x600"));
        c.t[0] = 200.0;
        assert!(stereo_rectify(&c, 800, 600).unwrap_err().to_string().contains("swap"));
    }

    #[test]
    fn distortion_round_trips() {
        let camera = rig().left;
        for (x, y) in [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.4)] {
            let (xd, yd) = distort(&camera, x, y);
            let (xu, yu) = undistort(&camera, xd, yd, 50);
            assert!((xu - x).abs() < 1e-10 && (yu - y).abs() < 1e-10);
        }
    }

    #[test]
    fn remap_with_the_identity_returns_the_image() {
        let image = Rgb32FImage::from_fn(20, 10, |x, y| Rgb([x as f32 / 20.0, y as f32 / 10.0, 0.5]));
        let camera = Camera::pinhole(50.0, 50.0, 10.0, 5.0);
        let p = [[50.0, 0.0, 10.0, 0.0], [0.0, 50.0, 5.0, 0.0], [0.0, 0.0, 1.0, 0.0]];
        let out = RectifyMap::new(&camera, &geometry::IDENTITY, &p, 20, 10).apply(&image);
        for (a, b) in out.pixels().zip(image.pixels()) {
            assert!((0..3).all(|c| (a.0[c] - b.0[c]).abs() < 1e-5));
        }
        // Shifted by half a pixel: bilinear blend of neighbours; outside is black.
        let shifted = [[50.0, 0.0, 10.5, 0.0], [0.0, 50.0, 5.0, 0.0], [0.0, 0.0, 1.0, 0.0]];
        let out = RectifyMap::new(&camera, &geometry::IDENTITY, &shifted, 20, 10).apply(&image);
        assert!((out.get_pixel(5, 3).0[0] - 4.5 / 20.0).abs() < 1e-5);
        assert_eq!(out.get_pixel(0, 0).0[2], 0.5 * 0.5, "left column half outside");
    }
}
