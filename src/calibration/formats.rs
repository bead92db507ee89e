//! Readers and writers of the calibration formats people actually have.
//!
//! - **JSON** (ours, documented in data/README.md): `image_size`, `units`,
//!   `left`/`right` `{K, dist}`, `R`, `T`.
//! - **OpenCV YAML**, as `cv::FileStorage` writes what `stereoCalibrate` returns:
//!   `!!opencv-matrix` blocks named `K1 D1 K2 D2 R T` (also `M1/M2`,
//!   `cameraMatrix1/2`, `distCoeffs1/2`), the size as `image_width`/`image_height`
//!   or `imageSize`, and an optional `units` (default mm: OpenCV's unit is the
//!   board square's, most often given in mm).
//! - **KITTI**: rectified 3x4 projection matrices, `P2`/`P3` (object, odometry)
//!   or `P_rect_02`/`P_rect_03` with `S_rect_02` (raw `calib_cam_to_cam.txt`,
//!   stereo 2015); cameras 0/1 when 2/3 are absent. Metres.
//! - **Middlebury** `calib.txt`: `cam0`, `cam1`, `doffs`, `baseline` (mm),
//!   `width`, `height`.
//!
//! Writers exist for each so that a calibration can be converted, and so the
//! tests can check every reader gives back the numbers written.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Calibration, CalibrationError, Camera, Units};
use crate::geometry::{self, Mat3};

fn syntax(format: &'static str, message: impl Into<String>) -> CalibrationError {
    CalibrationError::Syntax { format, message: message.into() }
}

// ---- JSON -------------------------------------------------------------------------

pub fn read_json(text: &str) -> Result<Calibration, CalibrationError> {
    serde_json::from_str(text).map_err(|e| syntax("JSON", e.to_string()))
}

pub fn write_json(calibration: &Calibration) -> String {
    serde_json::to_string_pretty(calibration).expect("a calibration serialises")
}

// ---- OpenCV FileStorage YAML ---------------------------------------------------------

#[derive(Debug)]
enum YamlValue {
    Matrix { rows: usize, cols: usize, data: Vec<f64> },
    Sequence(Vec<f64>),
    Scalar(String),
}

fn numbers(text: &str, format: &'static str) -> Result<Vec<f64>, CalibrationError> {
    text.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f64>().map_err(|_| syntax(format, format!("'{s}' is not a number"))))
        .collect()
}

/// The subset of YAML that FileStorage writes: top-level `name: value` pairs
/// where a value is a scalar, an inline `[ ... ]` list (possibly over several
/// lines) or an `!!opencv-matrix` mapping of `rows`, `cols`, `dt`, `data`.
fn parse_filestorage(text: &str) -> Result<BTreeMap<String, YamlValue>, CalibrationError> {
    const F: &str = "OpenCV YAML";
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let content = line.split('#').next().unwrap_or("");
        if content.trim().is_empty() || content.starts_with('%') || content.trim() == "---" {
            continue;
        }
        let top_level = !content.starts_with([' ', '\t']) && !content.trim_start().starts_with(']');
        match (top_level, content.split_once(':')) {
            (true, Some((key, rest))) => entries.push((key.trim().to_owned(), rest.trim().to_owned())),
            (true, None) => return Err(syntax(F, format!("unexpected line '{}'", content.trim()))),
            (false, _) => match entries.last_mut() {
                Some((_, body)) => {
                    body.push('\n');
                    body.push_str(content.trim());
                }
                None => return Err(syntax(F, "indented line before any key")),
            },
        }
    }
    let mut map = BTreeMap::new();
    for (key, body) in entries {
        let value = if let Some(matrix) = body.strip_prefix("!!opencv-matrix") {
            let mut fields: BTreeMap<&str, String> = BTreeMap::new();
            let mut current: Option<&str> = None;
            for part in matrix.lines().map(str::trim).filter(|l| !l.is_empty()) {
                match part.split_once(':') {
                    Some((name, rest)) if matches!(name.trim(), "rows" | "cols" | "dt" | "data") => {
                        let name = name.trim();
                        fields.insert(name, rest.trim().to_owned());
                        current = Some(name);
                    }
                    _ => match current {
                        Some(name) => {
                            let entry = fields.get_mut(name).expect("inserted above");
                            entry.push(' ');
                            entry.push_str(part);
                        }
                        None => return Err(syntax(F, format!("{key}: unexpected '{part}'"))),
                    },
                }
            }
            let count = |name: &str| -> Result<usize, CalibrationError> {
                fields
                    .get(name)
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| syntax(F, format!("{key}: no valid '{name}'")))
            };
            let (rows, cols) = (count("rows")?, count("cols")?);
            let data = fields.get("data").ok_or_else(|| syntax(F, format!("{key}: no 'data'")))?;
            let inner = data.trim().trim_start_matches('[').trim_end_matches(']');
            let data = numbers(inner, F)?;
            if data.len() != rows * cols {
                return Err(syntax(
                    F,
                    format!("{key}: {rows}x{cols} needs {} values, data has {}", rows * cols, data.len()),
                ));
            }
            YamlValue::Matrix { rows, cols, data }
        } else if body.starts_with('[') {
            let inner = body.trim().trim_start_matches('[').trim_end_matches(']');
            YamlValue::Sequence(numbers(inner, F)?)
        } else {
            YamlValue::Scalar(body.trim().trim_matches(['"', '\'']).to_owned())
        };
        map.insert(key, value);
    }
    Ok(map)
}

pub fn read_opencv_yaml(text: &str) -> Result<Calibration, CalibrationError> {
    const F: &str = "OpenCV YAML";
    let map = parse_filestorage(text)?;
    let find = |names: &[&'static str]| names.iter().find_map(|n| map.get(*n).map(|v| (*n, v)));
    let matrix = |names: &[&'static str], rows: usize, cols: usize| -> Result<Option<Vec<f64>>, CalibrationError> {
        match find(names) {
            None => Ok(None),
            Some((name, YamlValue::Matrix { rows: r, cols: c, data })) => {
                if r * c == rows * cols && (*r == rows || *c == rows) {
                    Ok(Some(data.clone()))
                } else {
                    Err(syntax(F, format!("{name} is {r}x{c}, expected {rows}x{cols}")))
                }
            }
            Some((_, YamlValue::Sequence(data))) if data.len() == rows * cols => Ok(Some(data.clone())),
            Some((name, _)) => Err(syntax(F, format!("{name} is not a {rows}x{cols} matrix"))),
        }
    };
    let required = |names: &[&'static str], rows, cols| {
        matrix(names, rows, cols)?.ok_or_else(|| syntax(F, format!("no {} (an !!opencv-matrix)", names.join(" / "))))
    };
    let k = |data: Vec<f64>| -> Mat3 {
        [[data[0], data[1], data[2]], [data[3], data[4], data[5]], [data[6], data[7], data[8]]]
    };
    let dist = |names: &[&'static str]| -> Result<Vec<f64>, CalibrationError> {
        match find(names) {
            None => Ok(Vec::new()),
            Some((_, YamlValue::Matrix { data, .. } | YamlValue::Sequence(data))) => Ok(data.clone()),
            Some((name, _)) => Err(syntax(F, format!("{name} is not a list of coefficients"))),
        }
    };
    let left = Camera {
        k: k(required(&["K1", "M1", "cameraMatrix1", "camera_matrix_left"], 3, 3)?),
        dist: dist(&["D1", "distCoeffs1", "dist_coeffs_left"])?,
    };
    let right = Camera {
        k: k(required(&["K2", "M2", "cameraMatrix2", "camera_matrix_right"], 3, 3)?),
        dist: dist(&["D2", "distCoeffs2", "dist_coeffs_right"])?,
    };
    // R may also be a Rodrigues vector (what cv::Rodrigues / solvePnP produce).
    let r = match matrix(&["R"], 3, 3) {
        Ok(Some(data)) => k(data),
        _ => match matrix(&["R"], 3, 1)? {
            Some(v) => geometry::rodrigues(&[v[0], v[1], v[2]]),
            None => return Err(syntax(F, "no R (3x3 rotation or 3x1 Rodrigues vector)")),
        },
    };
    let t = required(&["T"], 3, 1)?;
    let scalar = |name: &str| match map.get(name) {
        Some(YamlValue::Scalar(s)) => s.parse::<f64>().ok(),
        _ => None,
    };
    let image_size = match (scalar("image_width").or(scalar("width")), scalar("image_height").or(scalar("height"))) {
        (Some(w), Some(h)) => Some([w as u32, h as u32]),
        _ => match find(&["imageSize", "image_size"]) {
            Some((_, YamlValue::Sequence(v))) if v.len() == 2 => Some([v[0] as u32, v[1] as u32]),
            _ => None,
        },
    };
    let units = match map.get("units") {
        Some(YamlValue::Scalar(s)) => {
            Units::parse(s).ok_or_else(|| syntax(F, format!("units '{s}': use m, cm or mm")))?
        }
        _ => Units::Millimetres,
    };
    Ok(Calibration { image_size, units, left, right, r, t: [t[0], t[1], t[2]] })
}

fn yaml_matrix(out: &mut String, name: &str, rows: usize, cols: usize, data: &[f64]) {
    let values: Vec<String> = data.iter().map(|v| format!("{v:?}")).collect();
    let _ = write!(
        out,
        "{name}: !!opencv-matrix\n   rows: {rows}\n   cols: {cols}\n   dt: d\n   data: [ {} ]\n",
        values.join(", ")
    );
}

pub fn write_opencv_yaml(c: &Calibration) -> String {
    let mut out = String::from("%YAML:1.0\n---\n");
    if let Some([w, h]) = c.image_size {
        let _ = writeln!(out, "image_width: {w}\nimage_height: {h}");
    }
    let _ = writeln!(out, "units: {}", c.units.symbol());
    let flat = |m: &Mat3| m.iter().flatten().copied().collect::<Vec<f64>>();
    yaml_matrix(&mut out, "K1", 3, 3, &flat(&c.left.k));
    yaml_matrix(&mut out, "D1", 1, c.left.dist.len(), &c.left.dist);
    yaml_matrix(&mut out, "K2", 3, 3, &flat(&c.right.k));
    yaml_matrix(&mut out, "D2", 1, c.right.dist.len(), &c.right.dist);
    yaml_matrix(&mut out, "R", 3, 3, &flat(&c.r));
    yaml_matrix(&mut out, "T", 3, 1, &c.t);
    out
}

// ---- KITTI ----------------------------------------------------------------------------

/// `KEY: n n n ...` lines; keys with non-numeric values (calib_time) are skipped.
fn key_values(text: &str) -> BTreeMap<String, Vec<f64>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .filter_map(|(key, rest)| Some((key.trim().to_owned(), numbers(rest, "KITTI").ok()?)))
        .collect()
}

pub fn read_kitti(text: &str) -> Result<Calibration, CalibrationError> {
    const F: &str = "KITTI";
    let values = key_values(text);
    // Colour cameras 2 (left) and 3 (right) are the KITTI stereo benchmark's pair.
    let candidates = [
        ("P2", "P3", None),
        ("P_rect_02", "P_rect_03", Some("S_rect_02")),
        ("P0", "P1", None),
        ("P_rect_00", "P_rect_01", Some("S_rect_00")),
    ];
    let (left_key, right_key, size_key) = candidates
        .iter()
        .find(|(l, r, _)| values.contains_key(*l) && values.contains_key(*r))
        .ok_or_else(|| syntax(F, "no pair of projection matrices (P2/P3, P_rect_02/P_rect_03, P0/P1)"))?;
    let projection = |key: &str| -> Result<(Camera, [f64; 3]), CalibrationError> {
        let p = &values[key];
        if p.len() != 12 {
            return Err(syntax(F, format!("{key} has {} values, a 3x4 matrix has 12", p.len())));
        }
        let k: Mat3 = [[p[0], p[1], p[2]], [p[4], p[5], p[6]], [p[8], p[9], p[10]]];
        let inverse = geometry::inverse(&k)
            .ok_or_else(|| CalibrationError::Invalid(format!("{key}: its 3x3 part is singular")))?;
        // P = K [I | t]: the camera's offset from the rectified reference camera.
        let t = geometry::mul_vec(&inverse, &[p[3], p[7], p[11]]);
        Ok((Camera { k, dist: Vec::new() }, t))
    };
    let (left, t_left) = projection(left_key)?;
    let (right, t_right) = projection(right_key)?;
    let image_size = match size_key.and_then(|k| values.get(k)) {
        Some(s) if s.len() == 2 => Some([s[0].round() as u32, s[1].round() as u32]),
        _ => None,
    };
    let t = [t_right[0] - t_left[0], t_right[1] - t_left[1], t_right[2] - t_left[2]];
    Ok(Calibration { image_size, units: Units::Metres, left, right, r: geometry::IDENTITY, t })
}

/// Only a rectified pair has a KITTI or Middlebury form (both store rectified cameras).
fn require_rectified(c: &Calibration, format: &str) -> Result<(), CalibrationError> {
    if c.is_rectified() {
        Ok(())
    } else {
        Err(CalibrationError::Unsupported(format!(
            "{format} files hold rectified cameras only; this calibration has rotation or distortion"
        )))
    }
}

pub fn write_kitti(c: &Calibration) -> Result<String, CalibrationError> {
    require_rectified(c, "KITTI")?;
    // KITTI is in metres.
    let metres = c.units.in_mm() / 1000.0;
    let t = c.t.map(|v| v * metres);
    let row = |k: &Mat3, t: [f64; 3]| {
        let kt = geometry::mul_vec(k, &t);
        let v = [k[0][0], k[0][1], k[0][2], kt[0], k[1][0], k[1][1], k[1][2], kt[1], k[2][0], k[2][1], k[2][2], kt[2]];
        v.iter().map(|x| format!("{x:e}")).collect::<Vec<_>>().join(" ")
    };
    let mut out = String::new();
    if let Some([w, h]) = c.image_size {
        let _ = writeln!(out, "S_rect_02: {w:e} {h:e}");
    }
    let _ = writeln!(out, "P_rect_02: {}", row(&c.left.k, [0.0; 3]));
    if let Some([w, h]) = c.image_size {
        let _ = writeln!(out, "S_rect_03: {w:e} {h:e}");
    }
    let _ = writeln!(out, "P_rect_03: {}", row(&c.right.k, t));
    Ok(out)
}

// ---- Middlebury -------------------------------------------------------------------------

pub fn read_middlebury(text: &str) -> Result<Calibration, CalibrationError> {
    const F: &str = "Middlebury";
    let fields: BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim(), v.trim())).collect();
    let camera = |key: &str| -> Result<Camera, CalibrationError> {
        let text = fields.get(key).ok_or_else(|| syntax(F, format!("no {key}")))?;
        let v = numbers(text.trim_start_matches('[').trim_end_matches(']'), F)?;
        if v.len() != 9 {
            return Err(syntax(F, format!("{key} has {} values, a 3x3 matrix has 9", v.len())));
        }
        Ok(Camera { k: [[v[0], v[1], v[2]], [v[3], v[4], v[5]], [v[6], v[7], v[8]]], dist: Vec::new() })
    };
    let number = |key: &str| -> Result<Option<f64>, CalibrationError> {
        fields
            .get(key)
            .map(|v| v.parse::<f64>().map_err(|_| syntax(F, format!("{key}={v} is not a number"))))
            .transpose()
    };
    let left = camera("cam0")?;
    let right = camera("cam1")?;
    let baseline = number("baseline")?.ok_or_else(|| syntax(F, "no baseline"))?;
    // doffs is the principal points' x difference; a file where they disagree is corrupt.
    if let Some(doffs) = number("doffs")? {
        let implied = right.cx() - left.cx();
        if (doffs - implied).abs() > 0.01 {
            return Err(CalibrationError::Invalid(format!(
                "doffs={doffs} but cam1's cx minus cam0's is {implied}; they must agree"
            )));
        }
    }
    let image_size = match (number("width")?, number("height")?) {
        (Some(w), Some(h)) => Some([w as u32, h as u32]),
        _ => None,
    };
    // cam1 is to the right of cam0: X_r = X_l - (baseline, 0, 0).
    Ok(Calibration {
        image_size,
        units: Units::Millimetres,
        left,
        right,
        r: geometry::IDENTITY,
        t: [-baseline, 0.0, 0.0],
    })
}

pub fn write_middlebury(c: &Calibration) -> Result<String, CalibrationError> {
    require_rectified(c, "Middlebury")?;
    let k = |m: &Mat3| {
        format!(
            "[{} {} {}; {} {} {}; {} {} {}]",
            m[0][0], m[0][1], m[0][2], m[1][0], m[1][1], m[1][2], m[2][0], m[2][1], m[2][2]
        )
    };
    let mut out = format!(
        "cam0={}\ncam1={}\ndoffs={}\nbaseline={}\n",
        k(&c.left.k),
        k(&c.right.k),
        c.right.cx() - c.left.cx(),
        -c.t[0] * c.units.in_mm()
    );
    if let Some([w, h]) = c.image_size {
        let _ = write!(out, "width={w}\nheight={h}\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{parse, CalibrationFormat};
    use super::*;

    #[test]
    fn json_and_opencv_yaml_read_back_what_was_written() {
        let rig = super::super::tests::rig();
        let (json, format) = parse(&write_json(&rig)).unwrap();
        assert_eq!(format, CalibrationFormat::Json);
        assert_eq!(json, rig);
        let (yaml, format) = parse(&write_opencv_yaml(&rig)).unwrap();
        assert_eq!(format, CalibrationFormat::OpencvYaml);
        assert_eq!(yaml, rig);
    }

    #[test]
    fn opencv_yaml_as_filestorage_writes_it() {
        // Layout of cv::FileStorage output: exponent notation, data over several lines, no units.
        let text = "%YAML:1.0\n---\nimageSize: [ 640, 480 ]\nM1: !!opencv-matrix\n   rows: 3\n   cols: 3\n   dt: d\n   data: [ 6.1250000000000000e+02, 0., 3.1825e+02, 0.,\n       6.1175e+02, 2.415e+02, 0., 0., 1. ]\nD1: !!opencv-matrix\n   rows: 1\n   cols: 5\n   dt: d\n   data: [ -0.21, 0.043, 1.2e-03, -7.0e-04, 0. ]\nM2: !!opencv-matrix\n   rows: 3\n   cols: 3\n   dt: d\n   data: [ 615., 0., 322., 0., 614.5, 238., 0., 0., 1. ]\nD2: !!opencv-matrix\n   rows: 1\n   cols: 5\n   dt: d\n   data: [ -0.2, 0.04, -1.0e-03, 5.0e-04, 1.0e-02 ]\nR: !!opencv-matrix\n   rows: 3\n   cols: 1\n   dt: d\n   data: [ 4.0e-03, -1.2e-02, 2.0e-03 ]\nT: !!opencv-matrix\n   rows: 3\n   cols: 1\n   dt: d\n   data: [ -59.8, 0.35, -0.9 ]\n";
        let (c, _) = parse(text).unwrap();
        let rig = super::super::tests::rig();
        assert_eq!(c.image_size, Some([640, 480]));
        assert_eq!(c.units, Units::Millimetres);
        assert_eq!(
            (c.left.k, c.right.k, c.left.dist.clone(), c.t),
            (rig.left.k, rig.right.k, rig.left.dist.clone(), rig.t)
        );
        assert!(geometry::max_abs_diff(&c.r, &rig.r) < 1e-15);
        let broken = text.replace("cols: 5\n   dt: d\n   data: [ -0.21", "cols: 4\n   dt: d\n   data: [ -0.21");
        assert!(parse(&broken).unwrap_err().to_string().contains("D1: 1x4 needs 4 values, data has 5"));
    }

    #[test]
    fn kitti_reads_the_benchmark_files_and_back() {
        // KITTI 2015 training/calib_cam_to_cam/000000.txt, the rectified part.
        let text = "calib_time: 09-Jan-2012 13:57:47\nS_rect_02: 1.242000e+03 3.750000e+02\nR_rect_02: 9.999191e-01 1.228161e-02 -3.316013e-03 -1.228209e-02 9.999246e-01 -1.245511e-04 3.314233e-03 1.652686e-04 9.999945e-01\nP_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\nS_rect_03: 1.242000e+03 3.750000e+02\nP_rect_03: 7.215377e+02 0.000000e+00 6.095593e+02 -3.395242e+02 0.000000e+00 7.215377e+02 1.728540e+02 2.199936e+00 0.000000e+00 0.000000e+00 1.000000e+00 2.729905e-03\n";
        let (c, format) = parse(text).unwrap();
        assert_eq!(format, CalibrationFormat::Kitti);
        assert_eq!(c.image_size, Some([1242, 375]));
        assert_eq!(c.units, Units::Metres);
        assert_eq!(c.left.fx(), 721.5377);
        // The KITTI rig's colour cameras are 0.532 m apart.
        assert!((c.baseline() - 0.5327).abs() < 1e-3, "{}", c.baseline());
        assert!(c.t[0] < 0.0);
        let object_style = "P0: 7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00\nP1: 7.215377e+02 0.000000e+00 6.095593e+02 -3.875744e+02 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00\n";
        let (c, _) = parse(object_style).unwrap();
        assert!((c.t[0] + 0.537150).abs() < 1e-6, "{:?}", c.t);

        let synthetic = super::super::tests::synthetic();
        let (back, _) = parse(&write_kitti(&synthetic).unwrap()).unwrap();
        assert_eq!(back.image_size, synthetic.image_size);
        assert_eq!(back.left.k, synthetic.left.k);
        assert!((back.t[0] - synthetic.t[0]).abs() < 1e-12 && back.t[1] == 0.0 && back.t[2] == 0.0);
        assert!(write_kitti(&super::super::tests::rig()).is_err(), "an unrectified rig has no KITTI form");
    }

    #[test]
    fn middlebury_reads_calib_txt_and_back() {
        // Middlebury 2014 Motorcycle (full size).
        let text = "cam0=[3979.911 0 1244.772; 0 3979.911 1019.507; 0 0 1]\ncam1=[3979.911 0 1369.115; 0 3979.911 1019.507; 0 0 1]\ndoffs=124.343\nbaseline=193.001\nwidth=2964\nheight=1988\nndisp=270\nisint=0\nvmin=23\nvmax=245\ndyavg=0\ndymax=0\n";
        let (c, format) = parse(text).unwrap();
        assert_eq!(format, CalibrationFormat::Middlebury);
        assert_eq!((c.image_size, c.units, c.t), (Some([2964, 1988]), Units::Millimetres, [-193.001, 0.0, 0.0]));
        assert!(c.is_rectified());
        assert_eq!(parse(&write_middlebury(&c).unwrap()).unwrap().0, c);
        let bad = text.replace("doffs=124.343", "doffs=10");
        assert!(parse(&bad).unwrap_err().to_string().contains("must agree"));
        let zero = text.replace("baseline=193.001", "baseline=0");
        assert!(parse(&zero).unwrap_err().to_string().contains("baseline is zero"));
    }

    #[test]
    fn the_shipped_synthetic_calibration_reads_the_same_in_json_and_middlebury() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthetic");
        let (json, _) = parse(&std::fs::read_to_string(dir.join("calib.json")).unwrap()).unwrap();
        let (txt, _) = parse(&std::fs::read_to_string(dir.join("calib.txt")).unwrap()).unwrap();
        assert_eq!(json, super::super::tests::synthetic());
        assert_eq!((txt.left.k, txt.right.k, txt.image_size), (json.left.k, json.right.k, json.image_size));
        assert!(!txt.left.has_distortion() && !json.left.has_distortion());
        assert!((txt.baseline() - json.baseline() * json.units.in_mm()).abs() < 1e-9);
    }
}
