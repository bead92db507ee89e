//! Small dense 3-D geometry for calibration and rectification: 3x3 matrices,
//! vectors and Rodrigues rotations, in `f64`.
//!
//! Written out rather than pulled from a linear-algebra crate: everything here
//! is 3x3, and the few operations stereo rectification needs fit on a page.

/// Row-major 3x3 matrix.
pub type Mat3 = [[f64; 3]; 3];
pub type Vec3 = [f64; 3];

pub const IDENTITY: Mat3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

pub fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, value) in row.iter_mut().enumerate() {
            *value = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

pub fn mul_vec(a: &Mat3, v: &Vec3) -> Vec3 {
    [0, 1, 2].map(|i| a[i][0] * v[0] + a[i][1] * v[1] + a[i][2] * v[2])
}

pub fn transpose(a: &Mat3) -> Mat3 {
    [0, 1, 2].map(|i| [a[0][i], a[1][i], a[2][i]])
}

pub fn det(a: &Mat3) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

/// The inverse, or `None` when the matrix is singular (|det| below 1e-12 of its scale).
pub fn inverse(a: &Mat3) -> Option<Mat3> {
    let d = det(a);
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if !d.is_finite() || scale == 0.0 || d.abs() <= 1e-12 * scale.powi(3) {
        return None;
    }
    let c = |i: usize, j: usize| {
        let (r0, r1) = ((i + 1) % 3, (i + 2) % 3);
        let (c0, c1) = ((j + 1) % 3, (j + 2) % 3);
        a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0]
    };
    // Cofactors with cyclic indices carry their sign; the inverse is the transposed cofactor matrix / det.
    Some([0, 1, 2].map(|i| [0, 1, 2].map(|j| c(j, i) / d)))
}

pub fn cross(a: &Vec3, b: &Vec3) -> Vec3 {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

pub fn norm(v: &Vec3) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

pub fn scale(v: &Vec3, k: f64) -> Vec3 {
    v.map(|x| x * k)
}

/// Largest |a - b| over the entries.
pub fn max_abs_diff(a: &Mat3, b: &Mat3) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// How far `r` is from a proper rotation: max |R Rᵀ - I| (0 for a rotation), and det(R).
pub fn rotation_defect(r: &Mat3) -> (f64, f64) {
    (max_abs_diff(&mul(r, &transpose(r)), &IDENTITY), det(r))
}

/// Rotation matrix of the axis-angle vector `v` (|v| = angle in radians).
pub fn rodrigues(v: &Vec3) -> Mat3 {
    let theta = norm(v);
    if theta < 1e-15 {
        return IDENTITY;
    }
    let k = scale(v, 1.0 / theta);
    let (s, c) = theta.sin_cos();
    let kx = [[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]];
    let kk = mul(&kx, &kx);
    [0, 1, 2].map(|i| [0, 1, 2].map(|j| IDENTITY[i][j] + s * kx[i][j] + (1.0 - c) * kk[i][j]))
}

/// Axis-angle vector of a rotation matrix (the inverse of [`rodrigues`]), via a
/// quaternion so it stays accurate near 0 and near 180 degrees.
pub fn rodrigues_inverse(r: &Mat3) -> Vec3 {
    let trace = r[0][0] + r[1][1] + r[2][2];
    // Shepperd's method: build the quaternion from its largest component.
    let (w, x, y, z);
    if trace > r[0][0].max(r[1][1]).max(r[2][2]) {
        let s = (1.0 + trace).sqrt() * 2.0;
        w = 0.25 * s;
        x = (r[2][1] - r[1][2]) / s;
        y = (r[0][2] - r[2][0]) / s;
        z = (r[1][0] - r[0][1]) / s;
    } else if r[0][0] >= r[1][1] && r[0][0] >= r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        w = (r[2][1] - r[1][2]) / s;
        x = 0.25 * s;
        y = (r[0][1] + r[1][0]) / s;
        z = (r[0][2] + r[2][0]) / s;
    } else if r[1][1] >= r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        w = (r[0][2] - r[2][0]) / s;
        x = (r[0][1] + r[1][0]) / s;
        y = 0.25 * s;
        z = (r[1][2] + r[2][1]) / s;
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        w = (r[1][0] - r[0][1]) / s;
        x = (r[0][2] + r[2][0]) / s;
        y = (r[1][2] + r[2][1]) / s;
        z = 0.25 * s;
    }
    let (w, axis) = if w < 0.0 { (-w, [-x, -y, -z]) } else { (w, [x, y, z]) };
    let sin_half = norm(&axis);
    if sin_half < 1e-15 {
        return [0.0; 3];
    }
    let angle = 2.0 * sin_half.atan2(w);
    scale(&axis, angle / sin_half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_times_matrix_is_identity_and_singular_is_refused() {
        let a = [[480.0, 0.0, 255.5], [0.0, 470.0, 191.5], [0.0, 0.0, 1.0]];
        let inv = inverse(&a).unwrap();
        assert!(max_abs_diff(&mul(&a, &inv), &IDENTITY) < 1e-12);
        let b = [[1.0, 2.0, 3.0], [2.0, -1.0, 0.5], [0.3, 0.7, 4.0]];
        assert!(max_abs_diff(&mul(&inverse(&b).unwrap(), &b), &IDENTITY) < 1e-12);
        assert!(inverse(&[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 1.0]]).is_none());
        assert!(inverse(&[[0.0; 3]; 3]).is_none());
    }

    #[test]
    fn rodrigues_round_trips_small_medium_and_half_turn_angles() {
        for v in [
            [0.0, 0.0, 0.0],
            [1e-9, 0.0, 2e-9],
            [0.02, -0.03, 0.01],
            [0.5, 1.0, -0.7],
            [0.0, std::f64::consts::PI, 0.0],
        ] {
            let r = rodrigues(&v);
            let (defect, d) = rotation_defect(&r);
            assert!(defect < 1e-12 && (d - 1.0).abs() < 1e-12);
            let back = rodrigues_inverse(&r);
            assert!(max_abs_diff(&rodrigues(&back), &r) < 1e-12, "{v:?} -> {back:?}");
        }
        // A quarter turn about z takes x to y.
        let r = rodrigues(&[0.0, 0.0, std::f64::consts::FRAC_PI_2]);
        let y = mul_vec(&r, &[1.0, 0.0, 0.0]);
        assert!((y[1] - 1.0).abs() < 1e-12 && y[0].abs() < 1e-12);
    }
}
