//! Stereo calibration: both cameras' intrinsics and distortion, the pose of the
//! right camera relative to the left, the image size and the length unit.
//!
//! One type, [`Calibration`], read from four formats (see [`formats`]): our
//! documented JSON (data/README.md), OpenCV's stereo YAML (FileStorage),
//! KITTI calib files and Middlebury `calib.txt`. Whatever the source, the
//! conventions are OpenCV's: `X_r = R X_l + T`, pixel coordinates with the
//! origin at the centre of the top-left pixel, distortion `k1 k2 p1 p2 [k3 [k4
//! k5 k6]]`. Every reader ends in [`Calibration::validate`], so nothing
//! inconsistent (a singular camera matrix, a zero baseline, a size that
//! disagrees with the images) gets as far as rectification.

pub mod formats;

use serde::{Deserialize, Serialize};

use crate::geometry::{self, Mat3, Vec3};

/// Length unit of `T` (and so of depth and point clouds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub enum Units {
    #[serde(rename = "m")]
    Metres,
    #[serde(rename = "cm")]
    Centimetres,
    #[serde(rename = "mm")]
    Millimetres,
}

impl Units {
    /// Millimetres in one unit (16-bit depth PNGs are in mm).
    pub fn in_mm(self) -> f64 {
        match self {
            Units::Metres => 1000.0,
            Units::Centimetres => 10.0,
            Units::Millimetres => 1.0,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Units::Metres => "m",
            Units::Centimetres => "cm",
            Units::Millimetres => "mm",
        }
    }

    pub fn parse(text: &str) -> Option<Units> {
        match text.trim() {
            "m" | "metre" | "meter" | "metres" | "meters" => Some(Units::Metres),
            "cm" | "centimetres" | "centimeters" => Some(Units::Centimetres),
            "mm" | "millimetres" | "millimeters" => Some(Units::Millimetres),
            _ => None,
        }
    }
}

/// One pinhole camera with lens distortion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Camera {
    /// `[[fx, s, cx], [0, fy, cy], [0, 0, 1]]`, pixels.
    #[serde(rename = "K")]
    pub k: Mat3,
    /// `k1 k2 p1 p2 [k3 [k4 k5 k6]]` (OpenCV's order); empty means none.
    #[serde(default)]
    pub dist: Vec<f64>,
}

impl Camera {
    /// A distortion-free camera.
    pub fn pinhole(fx: f64, fy: f64, cx: f64, cy: f64) -> Camera {
        Camera { k: [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dist: Vec::new() }
    }

    pub fn fx(&self) -> f64 {
        self.k[0][0]
    }
    pub fn fy(&self) -> f64 {
        self.k[1][1]
    }
    pub fn cx(&self) -> f64 {
        self.k[0][2]
    }
    pub fn cy(&self) -> f64 {
        self.k[1][2]
    }

    pub fn has_distortion(&self) -> bool {
        self.dist.iter().any(|c| *c != 0.0)
    }

    /// Distortion coefficient `i` in OpenCV's order, 0 where not given.
    pub fn coefficient(&self, i: usize) -> f64 {
        self.dist.get(i).copied().unwrap_or(0.0)
    }
}

/// A calibrated stereo pair (what every format is read into).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// `[width, height]` the calibration was made at; `None` when the file does
    /// not say (KITTI projection matrices), and then any size is accepted.
    #[serde(rename = "image_size", default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[u32; 2]>,
    pub units: Units,
    pub left: Camera,
    pub right: Camera,
    /// Rotation from the left camera's frame to the right camera's.
    #[serde(rename = "R")]
    pub r: Mat3,
    /// Translation from the left camera's frame to the right camera's (`X_r = R X_l + T`).
    #[serde(rename = "T")]
    pub t: Vec3,
}

/// What can be wrong with a calibration file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    #[error("the calibration is not in a format we read (JSON, OpenCV YAML, KITTI or Middlebury calib.txt)")]
    UnknownFormat,
    #[error("the {format} calibration cannot be read: {message}")]
    Syntax { format: &'static str, message: String },
    #[error("the calibration is inconsistent: {0}")]
    Invalid(String),
    #[error("the calibration is for {calib_width}x{calib_height} images but the images are {width}x{height}")]
    SizeMismatch { calib_width: u32, calib_height: u32, width: u32, height: u32 },
    #[error("{0}")]
    Unsupported(String),
}

/// Tolerances of [`Calibration::is_rectified`]: a pose this close to pure
/// x-translation moves matched points by far less than a pixel across a frame.
const ROTATION_TOLERANCE: f64 = 1e-6;
const OFF_AXIS_TOLERANCE: f64 = 1e-6;

impl Calibration {
    /// Checks the numbers make a usable stereo pair; every reader calls this.
    pub fn validate(&self) -> Result<(), CalibrationError> {
        let invalid = |message: String| Err(CalibrationError::Invalid(message));
        if let Some([w, h]) = self.image_size {
            if w == 0 || h == 0 || w > 65_535 || h > 65_535 {
                return invalid(format!("image size {w}x{h} is not a usable image size"));
            }
        }
        for (name, camera) in [("left", &self.left), ("right", &self.right)] {
            let k = &camera.k;
            if k.iter().flatten().any(|v| !v.is_finite()) {
                return invalid(format!("the {name} camera matrix has a value that is not a finite number"));
            }
            if k[1][0] != 0.0 || k[2][0] != 0.0 || k[2][1] != 0.0 || (k[2][2] - 1.0).abs() > 1e-9 {
                return invalid(format!(
                    "the {name} camera matrix must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]], its last rows are {:?}, {:?}",
                    k[1], k[2]
                ));
            }
            if geometry::inverse(k).is_none() || k[0][0] <= 0.0 || k[1][1] <= 0.0 {
                return invalid(format!(
                    "the {name} camera matrix is singular or has a focal length that is not positive (fx = {}, fy = {})",
                    k[0][0], k[1][1]
                ));
            }
            if !matches!(camera.dist.len(), 0 | 4 | 5 | 8) {
                return invalid(format!(
                    "the {name} distortion has {} coefficients; give 0, 4, 5 or 8 (k1 k2 p1 p2 [k3 [k4 k5 k6]])",
                    camera.dist.len()
                ));
            }
            if camera.dist.iter().any(|c| !c.is_finite()) {
                return invalid(format!("the {name} distortion has a value that is not a finite number"));
            }
        }
        if self.r.iter().flatten().any(|v| !v.is_finite()) || self.t.iter().any(|v| !v.is_finite()) {
            return invalid("R or T has a value that is not a finite number".into());
        }
        let (defect, det) = geometry::rotation_defect(&self.r);
        if defect > 1e-4 || (det - 1.0).abs() > 1e-4 {
            return invalid(format!(
                "R is not a rotation matrix (|R Rᵀ - I| = {defect:.2e}, det R = {det:.6}; it must be orthonormal with det +1)"
            ));
        }
        if geometry::norm(&self.t) == 0.0 {
            return invalid("the baseline is zero (T = 0): two cameras at the same place see no depth".into());
        }
        Ok(())
    }

    /// Refuses images of another size than the calibration's.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), CalibrationError> {
        match self.image_size {
            Some([w, h]) if (w, h) != (width, height) => {
                Err(CalibrationError::SizeMismatch { calib_width: w, calib_height: h, width, height })
            }
            _ => Ok(()),
        }
    }

    /// The same rig for its images resized from `from` to `to` (width, height): each
    /// camera's focal lengths, skew and principal point scale with the image, about
    /// pixel centres (`c' = (c + 0.5) s - 0.5`); distortion, rotation and baseline stay.
    pub fn scaled(&self, from: (u32, u32), to: (u32, u32)) -> Calibration {
        let sx = f64::from(to.0) / f64::from(from.0);
        let sy = f64::from(to.1) / f64::from(from.1);
        let camera = |c: &Camera| {
            let k = c.k;
            let k = [
                [k[0][0] * sx, k[0][1] * sx, (k[0][2] + 0.5) * sx - 0.5],
                [0.0, k[1][1] * sy, (k[1][2] + 0.5) * sy - 0.5],
                [0.0, 0.0, 1.0],
            ];
            Camera { k, dist: c.dist.clone() }
        };
        Calibration {
            image_size: self.image_size.map(|_| [to.0, to.1]),
            units: self.units,
            left: camera(&self.left),
            right: camera(&self.right),
            r: self.r,
            t: self.t,
        }
    }

    /// Distance between the camera centres, in `units`.
    pub fn baseline(&self) -> f64 {
        geometry::norm(&self.t)
    }

    /// Already a rectified pair? No distortion, no rotation between the cameras,
    /// translation along x only, same fy and cy: then rows already match and
    /// the images are used as they are (cx may differ: Middlebury's `doffs`).
    pub fn is_rectified(&self) -> bool {
        let b = self.baseline();
        !self.left.has_distortion()
            && !self.right.has_distortion()
            && geometry::max_abs_diff(&self.r, &geometry::IDENTITY) < ROTATION_TOLERANCE
            && self.t[1].abs() <= OFF_AXIS_TOLERANCE * b
            && self.t[2].abs() <= OFF_AXIS_TOLERANCE * b
            && (self.left.fy() - self.right.fy()).abs() < 1e-6 * self.left.fy()
            && (self.left.fx() - self.right.fx()).abs() < 1e-6 * self.left.fx()
            && (self.left.cy() - self.right.cy()).abs() < 1e-6
            && self.left.k[0][1] == 0.0
            && self.right.k[0][1] == 0.0
    }
}

/// The formats [`parse`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "engine", derive(utoipa::ToSchema))]
pub enum CalibrationFormat {
    Json,
    OpencvYaml,
    Kitti,
    Middlebury,
}

impl CalibrationFormat {
    pub fn name(self) -> &'static str {
        match self {
            CalibrationFormat::Json => "JSON",
            CalibrationFormat::OpencvYaml => "OpenCV YAML",
            CalibrationFormat::Kitti => "KITTI",
            CalibrationFormat::Middlebury => "Middlebury",
        }
    }
}

/// Which format `text` is in, from its first meaningful characters and keys.
pub fn detect(text: &str) -> Option<CalibrationFormat> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') {
        return Some(CalibrationFormat::Json);
    }
    if trimmed.starts_with("%YAML") || trimmed.contains("!!opencv-matrix") {
        return Some(CalibrationFormat::OpencvYaml);
    }
    let keys: Vec<&str> = trimmed
        .lines()
        .filter_map(|l| l.split([':', '=']).next())
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .collect();
    if keys.contains(&"cam0") && keys.contains(&"baseline") {
        return Some(CalibrationFormat::Middlebury);
    }
    if keys.iter().any(|k| matches!(*k, "P0" | "P1" | "P2" | "P3") || k.starts_with("P_rect_")) {
        return Some(CalibrationFormat::Kitti);
    }
    None
}

/// Reads a calibration in any of the supported formats and validates it.
pub fn parse(text: &str) -> Result<(Calibration, CalibrationFormat), CalibrationError> {
    let format = detect(text).ok_or(CalibrationError::UnknownFormat)?;
    let calibration = match format {
        CalibrationFormat::Json => formats::read_json(text)?,
        CalibrationFormat::OpencvYaml => formats::read_opencv_yaml(text)?,
        CalibrationFormat::Kitti => formats::read_kitti(text)?,
        CalibrationFormat::Middlebury => formats::read_middlebury(text)?,
    };
    calibration.validate()?;
    Ok((calibration, format))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A realistic rig: different lenses with distortion, a 0.7 degree twist, 60 mm baseline.
    pub(crate) fn rig() -> Calibration {
        Calibration {
            image_size: Some([640, 480]),
            units: Units::Millimetres,
            left: Camera {
                k: [[612.5, 0.0, 318.25], [0.0, 611.75, 241.5], [0.0, 0.0, 1.0]],
                dist: vec![-0.21, 0.043, 0.0012, -0.0007, 0.0],
            },
            right: Camera {
                k: [[615.0, 0.0, 322.0], [0.0, 614.5, 238.0], [0.0, 0.0, 1.0]],
                dist: vec![-0.2, 0.04, -0.001, 0.0005, 0.01],
            },
            r: geometry::rodrigues(&[0.004, -0.012, 0.002]),
            t: [-59.8, 0.35, -0.9],
        }
    }

    /// The shipped synthetic pair's calibration (data/synthetic/calib.json).
    pub(crate) fn synthetic() -> Calibration {
        Calibration {
            image_size: Some([512, 384]),
            units: Units::Metres,
            left: Camera { dist: vec![0.0; 5], ..Camera::pinhole(480.0, 480.0, 255.5, 191.5) },
            right: Camera { dist: vec![0.0; 5], ..Camera::pinhole(480.0, 480.0, 255.5, 191.5) },
            r: geometry::IDENTITY,
            t: [-0.1, 0.0, 0.0],
        }
    }

    #[test]
    fn a_scaled_rig_keeps_its_geometry_about_pixel_centres() {
        let half = synthetic().scaled((512, 384), (256, 192));
        assert_eq!(half.image_size, Some([256, 192]));
        // The image centre (255.5, 191.5) stays the centre: (127.5, 95.5).
        assert_eq!(half.left.k, [[240.0, 0.0, 127.5], [0.0, 240.0, 95.5], [0.0, 0.0, 1.0]]);
        assert_eq!((half.t, half.r), (synthetic().t, synthetic().r));
        assert!(half.validate().is_ok());
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert!(synthetic().validate().is_ok());
        let mut c = synthetic();
        c.t = [0.0; 3];
        assert!(c.validate().unwrap_err().to_string().contains("baseline is zero"));
        let mut c = synthetic();
        c.left.k[0][0] = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("singular"));
        let mut c = synthetic();
        c.r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]];
        assert!(c.validate().unwrap_err().to_string().contains("not a rotation"));
        let mut c = synthetic();
        c.r = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        assert!(c.validate().unwrap_err().to_string().contains("det +1"));
        let mut c = synthetic();
        c.right.dist = vec![0.1, 0.2, 0.3];
        assert!(c.validate().unwrap_err().to_string().contains("3 coefficients"));
        let mut c = synthetic();
        c.image_size = Some([0, 384]);
        assert!(c.validate().is_err());
        let mut c = synthetic();
        c.left.k[2] = [0.0, 0.0, 2.0];
        assert!(c.validate().unwrap_err().to_string().contains("last rows"));
        let mut c = synthetic();
        c.t[0] = f64::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn size_check_and_rectified_test() {
        let c = synthetic();
        assert!(c.check_size(512, 384).is_ok());
        assert_eq!(
            c.check_size(640, 480).unwrap_err().to_string(),
            "the calibration is for 512x384 images but the images are 640x480"
        );
        assert!(c.is_rectified());
        let mut rotated = synthetic();
        rotated.r = geometry::rodrigues(&[0.0, 0.01, 0.0]);
        assert!(!rotated.is_rectified());
        let mut distorted = synthetic();
        distorted.left.dist = vec![-0.1, 0.0, 0.0, 0.0];
        assert!(!distorted.is_rectified());
        let mut doffs = synthetic();
        doffs.right.k[0][2] += 20.0;
        assert!(doffs.is_rectified(), "a principal-point offset in x is still a rectified pair");
    }

    #[test]
    fn formats_are_told_apart() {
        assert_eq!(detect("{\"left\": {}}"), Some(CalibrationFormat::Json));
        assert_eq!(detect("%YAML:1.0\n---\nK1: !!opencv-matrix\n"), Some(CalibrationFormat::OpencvYaml));
        assert_eq!(detect("P0: 1 0 0 0 0 1 0 0 0 0 1 0\nP1: 1 0 0 0\n"), Some(CalibrationFormat::Kitti));
        assert_eq!(detect("calib_time: x\nP_rect_02: 1 2 3\n"), Some(CalibrationFormat::Kitti));
        assert_eq!(detect("cam0=[1 0 0; 0 1 0; 0 0 1]\nbaseline=100\n"), Some(CalibrationFormat::Middlebury));
        assert_eq!(detect("hello"), None);
        assert_eq!(parse("hello").unwrap_err(), CalibrationError::UnknownFormat);
    }
}
