//! A synthetic stereo scene with exact ground truth, rendered by ray casting.
//!
//! The sample pair in `data/synthetic/` comes from here (`stereo-recon
//! render-synthetic data/synthetic`). Two parallel pinhole cameras (already
//! rectified) look at a textured room: a floor, a back wall, a slanted side
//! wall, two spheres and a box. Because the disparity of a point at depth `Z`
//! is exactly `f * B / Z` for rectified cameras, the ground truth is exact at
//! every pixel centre, not estimated.
//!
//! Decisions:
//! - Textures are solid (3D) procedural noise evaluated at the hit point and
//!   shading is Lambertian, so a surface point looks the same from both
//!   cameras, as real matte surfaces do.
//! - Only integer hashing, +, *, / and sqrt are used (no sin/cos/pow), so the
//!   output is bit-for-bit reproducible on any IEEE-754 machine.
//! - Images are 3x3 supersampled; the ground truth uses the pixel-centre ray.

use std::path::Path;

use image::RgbImage;
use serde::Serialize;

use crate::codec::{kitti, pfm};
use crate::disparity::DisparityMap;

/// Default output size (multiples of 16, so the network needs no padding).
pub const WIDTH: u32 = 512;
pub const HEIGHT: u32 = 384;
/// Focal length in pixels at the default width.
pub const FOCAL_PX: f64 = 480.0;
/// Distance between the camera centres, metres.
pub const BASELINE_M: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Vec3 {
    x: f64,
    y: f64,
    z: f64,
}

const fn v(x: f64, y: f64, z: f64) -> Vec3 {
    Vec3 { x, y, z }
}

impl Vec3 {
    fn add(self, o: Vec3) -> Vec3 {
        v(self.x + o.x, self.y + o.y, self.z + o.z)
    }
    fn sub(self, o: Vec3) -> Vec3 {
        v(self.x - o.x, self.y - o.y, self.z - o.z)
    }
    fn scale(self, k: f64) -> Vec3 {
        v(self.x * k, self.y * k, self.z * k)
    }
    fn dot(self, o: Vec3) -> f64 {
        self.x * o.x + self.y * o.y + self.z * o.z
    }
    fn normalized(self) -> Vec3 {
        self.scale(1.0 / self.dot(self).sqrt())
    }
}

/// Pinhole intrinsics of both cameras (identical after rectification).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Intrinsics {
    pub width: u32,
    pub height: u32,
    pub fx: f64,
    pub fy: f64,
    pub cx: f64,
    pub cy: f64,
}

impl Intrinsics {
    /// The scene's cameras at `width` x `height`: the focal length scales with
    /// the width, the principal point is the image centre.
    pub fn for_size(width: u32, height: u32) -> Self {
        let f = FOCAL_PX * f64::from(width) / f64::from(WIDTH);
        Intrinsics {
            width,
            height,
            fx: f,
            fy: f,
            cx: (f64::from(width) - 1.0) / 2.0,
            cy: (f64::from(height) - 1.0) / 2.0,
        }
    }

    fn ray(&self, u: f64, w: f64) -> Vec3 {
        v((u - self.cx) / self.fx, (w - self.cy) / self.fy, 1.0)
    }
}

#[derive(Clone, Copy, Debug)]
enum Material {
    Floor,
    Wall,
    SideWall,
    Marble,
    Glaze,
    Wood,
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Points with `normal . p = offset`.
    Plane {
        normal: Vec3,
        offset: f64,
    },
    Sphere {
        centre: Vec3,
        radius: f64,
    },
    /// Axis-aligned box.
    Cuboid {
        min: Vec3,
        max: Vec3,
    },
}

#[derive(Clone, Copy, Debug)]
struct Object {
    shape: Shape,
    material: Material,
}

struct Hit {
    t: f64,
    point: Vec3,
    normal: Vec3,
    material: Material,
}

/// The plane `n . p = offset`, stored with a unit normal.
fn plane(n: Vec3, offset: f64) -> Shape {
    let length = n.dot(n).sqrt();
    Shape::Plane { normal: n.scale(1.0 / length), offset: offset / length }
}

/// The room, in the left camera's frame: x right, y down, z forward, metres.
fn scene() -> Vec<Object> {
    vec![
        // Floor 0.9 m below the cameras, back wall 6 m ahead.
        Object { shape: plane(v(0.0, 1.0, 0.0), 0.9), material: Material::Floor },
        Object { shape: plane(v(0.0, 0.0, 1.0), 6.0), material: Material::Wall },
        // Side wall on the left, x = -1.9 + 0.2 z: seen at a grazing angle, its depth
        // runs from 2.6 m to the back wall.
        Object { shape: plane(v(1.0, 0.0, -0.2), -1.9), material: Material::SideWall },
        Object { shape: Shape::Sphere { centre: v(-0.45, 0.35, 2.4), radius: 0.55 }, material: Material::Marble },
        Object { shape: Shape::Sphere { centre: v(0.75, 0.55, 1.7), radius: 0.35 }, material: Material::Glaze },
        Object { shape: Shape::Cuboid { min: v(0.15, 0.25, 3.0), max: v(1.05, 0.9, 3.6) }, material: Material::Wood },
    ]
}

fn intersect(object: &Object, origin: Vec3, dir: Vec3) -> Option<(f64, Vec3)> {
    const EPS: f64 = 1e-9;
    match object.shape {
        Shape::Plane { normal, offset } => {
            let denom = normal.dot(dir);
            if denom.abs() < EPS {
                return None;
            }
            let t = (offset - normal.dot(origin)) / denom;
            (t > EPS).then_some((t, if denom < 0.0 { normal } else { normal.scale(-1.0) }))
        }
        Shape::Sphere { centre, radius } => {
            let oc = origin.sub(centre);
            let a = dir.dot(dir);
            let b = oc.dot(dir);
            let c = oc.dot(oc) - radius * radius;
            let disc = b * b - a * c;
            if disc < 0.0 {
                return None;
            }
            let root = disc.sqrt();
            let t = [(-b - root) / a, (-b + root) / a].into_iter().find(|t| *t > EPS)?;
            let normal = origin.add(dir.scale(t)).sub(centre).scale(1.0 / radius);
            Some((t, normal))
        }
        Shape::Cuboid { min, max } => {
            let (mut near, mut far) = (f64::NEG_INFINITY, f64::INFINITY);
            let mut normal = v(0.0, 0.0, 0.0);
            for (o, d, lo, hi, axis) in [
                (origin.x, dir.x, min.x, max.x, v(1.0, 0.0, 0.0)),
                (origin.y, dir.y, min.y, max.y, v(0.0, 1.0, 0.0)),
                (origin.z, dir.z, min.z, max.z, v(0.0, 0.0, 1.0)),
            ] {
                if d.abs() < EPS {
                    if o < lo || o > hi {
                        return None;
                    }
                    continue;
                }
                let (t0, t1) = ((lo - o) / d, (hi - o) / d);
                let (t_in, t_out, n) = if t0 < t1 { (t0, t1, axis.scale(-1.0)) } else { (t1, t0, axis) };
                if t_in > near {
                    near = t_in;
                    normal = n;
                }
                far = far.min(t_out);
            }
            (near <= far && near > EPS).then_some((near, normal))
        }
    }
}

fn cast(objects: &[Object], origin: Vec3, dir: Vec3) -> Option<Hit> {
    objects
        .iter()
        .filter_map(|o| intersect(o, origin, dir).map(|(t, n)| (t, n, o.material)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(t, normal, material)| Hit { t, point: origin.add(dir.scale(t)), normal, material })
}

// ---- Solid texture: hashed value noise, fractal sum --------------------------------

fn hash(x: i64, y: i64, z: i64, seed: u64) -> f64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for k in [x, y, z] {
        h ^= k as u64;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn smooth(t: f64) -> f64 {
    t * t * (3.0 - 2.0 * t)
}

fn lerp(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * t
}

fn value_noise(p: Vec3, seed: u64) -> f64 {
    let (fx, fy, fz) = (p.x.floor(), p.y.floor(), p.z.floor());
    let (ix, iy, iz) = (fx as i64, fy as i64, fz as i64);
    let (tx, ty, tz) = (smooth(p.x - fx), smooth(p.y - fy), smooth(p.z - fz));
    let corner = |dx: i64, dy: i64, dz: i64| hash(ix + dx, iy + dy, iz + dz, seed);
    let x00 = lerp(corner(0, 0, 0), corner(1, 0, 0), tx);
    let x10 = lerp(corner(0, 1, 0), corner(1, 1, 0), tx);
    let x01 = lerp(corner(0, 0, 1), corner(1, 0, 1), tx);
    let x11 = lerp(corner(0, 1, 1), corner(1, 1, 1), tx);
    lerp(lerp(x00, x10, ty), lerp(x01, x11, ty), tz)
}

/// Fractal noise in [0, 1): five octaves, each twice as fine and half as strong.
fn fbm(p: Vec3, seed: u64) -> f64 {
    let (mut sum, mut amplitude, mut total, mut q) = (0.0, 0.5, 0.0, p);
    for octave in 0..5 {
        sum += amplitude * value_noise(q, seed + octave);
        total += amplitude;
        amplitude *= 0.5;
        q = q.scale(2.0);
    }
    sum / total
}

fn mix(a: [f64; 3], b: [f64; 3], t: f64) -> [f64; 3] {
    [lerp(a[0], b[0], t), lerp(a[1], b[1], t), lerp(a[2], b[2], t)]
}

fn fract(x: f64) -> f64 {
    x - x.floor()
}

/// Surface colour (linear, 0..1) of `material` at world point `p`.
fn albedo(material: Material, p: Vec3) -> [f64; 3] {
    match material {
        Material::Floor => {
            // 0.4 m tiles with dark grout, each tile its own stone tone.
            let (u, w) = (p.x / 0.4, p.z / 0.4);
            let grout = fract(u) < 0.04 || fract(w) < 0.04;
            let tile = hash(u.floor() as i64, 0, w.floor() as i64, 11);
            let grain = fbm(p.scale(9.0), 3);
            let base = mix([0.55, 0.45, 0.35], [0.8, 0.75, 0.65], tile);
            if grout {
                [0.15, 0.14, 0.13]
            } else {
                mix(base, [0.2, 0.18, 0.15], grain * 0.8)
            }
        }
        Material::Wall => {
            // Bricks 0.5 x 0.2 m, alternate rows offset, mottled.
            let row = (p.y / 0.2).floor();
            let u = p.x / 0.5 + fract(row / 2.0);
            let mortar = fract(p.y / 0.2) < 0.08 || fract(u) < 0.04;
            let brick = hash(u.floor() as i64, row as i64, 0, 21);
            let mottle = fbm(p.scale(6.0), 5);
            let base = mix([0.55, 0.2, 0.12], [0.75, 0.4, 0.25], brick);
            if mortar {
                [0.7, 0.68, 0.62]
            } else {
                mix(base, [0.25, 0.1, 0.08], mottle * 0.7)
            }
        }
        Material::SideWall => {
            let n = fbm(p.scale(4.0), 7);
            let fine = fbm(p.scale(25.0), 8);
            mix(mix([0.2, 0.35, 0.55], [0.75, 0.8, 0.85], n), [0.1, 0.1, 0.15], fine * 0.5)
        }
        Material::Marble => {
            // Veins: bands of x + y perturbed by noise.
            let warp = fbm(p.scale(3.0), 13);
            let band = fract((p.x + p.y) * 4.0 + warp * 4.0);
            let vein = if band < 0.5 { band * 2.0 } else { 2.0 - band * 2.0 };
            mix([0.95, 0.93, 0.9], [0.25, 0.3, 0.35], vein * vein * (0.5 + 0.5 * fbm(p.scale(20.0), 14)))
        }
        Material::Glaze => {
            let n = fbm(p.scale(8.0), 17);
            let spots = if fbm(p.scale(14.0), 18) > 0.6 { 0.0 } else { 1.0 };
            mix([0.1, 0.5, 0.2], [0.9, 0.8, 0.2], n).map(|c| c * (0.5 + 0.5 * spots))
        }
        Material::Wood => {
            // Rings around a vertical axis through the box, with grain noise.
            let r = ((p.x - 0.6) * (p.x - 0.6) + (p.z - 3.3) * (p.z - 3.3)).sqrt();
            let ring = fract(r * 12.0 + fbm(p.scale(5.0), 23) * 2.0);
            mix([0.45, 0.27, 0.12], [0.8, 0.6, 0.35], ring).map(|c| c * (0.8 + 0.2 * fbm(p.scale(40.0), 24)))
        }
    }
}

/// Lambertian shading from one fixed light plus ambient: view-independent.
fn shade(hit: &Hit) -> [f64; 3] {
    // From above, to the right and behind the cameras, so every surface gets some direct light.
    let light = v(0.45, -1.0, -0.7).normalized();
    let lambert = hit.normal.dot(light).max(0.0);
    albedo(hit.material, hit.point).map(|c| c * (0.35 + 0.65 * lambert))
}

/// A rendered pair with its exact disparity and the cameras that produced it.
pub struct RenderedPair {
    pub left: RgbImage,
    pub right: RgbImage,
    pub disparity: DisparityMap,
    pub intrinsics: Intrinsics,
    pub baseline_m: f64,
}

fn render_view(objects: &[Object], k: &Intrinsics, centre: Vec3) -> RgbImage {
    render_posed_view(objects, k, centre, &crate::geometry::IDENTITY)
}

/// A view from `centre`, the camera turned by `to_world` (camera frame -> world frame).
fn render_posed_view(objects: &[Object], k: &Intrinsics, centre: Vec3, to_world: &crate::geometry::Mat3) -> RgbImage {
    const SAMPLES: u32 = 3;
    RgbImage::from_fn(k.width, k.height, |i, j| {
        let mut acc = [0.0; 3];
        for sy in 0..SAMPLES {
            for sx in 0..SAMPLES {
                let du = (f64::from(sx) + 0.5) / f64::from(SAMPLES) - 0.5;
                let dv = (f64::from(sy) + 0.5) / f64::from(SAMPLES) - 0.5;
                let ray = k.ray(f64::from(i) + du, f64::from(j) + dv);
                let turned = crate::geometry::mul_vec(to_world, &[ray.x, ray.y, ray.z]);
                let dir = v(turned[0], turned[1], turned[2]);
                let colour = cast(objects, centre, dir).map_or([0.0; 3], |hit| shade(&hit));
                for c in 0..3 {
                    acc[c] += colour[c];
                }
            }
        }
        let n = f64::from(SAMPLES * SAMPLES);
        image::Rgb(acc.map(|c| ((c / n).clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

/// Renders the scene at `width` x `height`.
pub fn render(width: u32, height: u32) -> RenderedPair {
    render_from(width, height, [0.0; 3])
}

/// Renders the scene with the rig moved to `position` (metres; the left
/// camera's centre, both cameras still looking down +z): one frame of a
/// moving-camera sequence, with its exact disparity.
pub fn render_from(width: u32, height: u32, position: [f64; 3]) -> RenderedPair {
    let objects = scene();
    let k = Intrinsics::for_size(width, height);
    let centre = v(position[0], position[1], position[2]);
    let left = render_view(&objects, &k, centre);
    let right = render_view(&objects, &k, v(position[0] + BASELINE_M, position[1], position[2]));
    let mut values = Vec::with_capacity(width as usize * height as usize);
    for j in 0..height {
        for i in 0..width {
            let dir = k.ray(f64::from(i), f64::from(j));
            // The ray has z = 1, so its parameter t is the depth Z.
            let d = cast(&objects, centre, dir).map_or(f64::INFINITY, |hit| k.fx * BASELINE_M / hit.t);
            values.push(d as f32);
        }
    }
    let disparity = DisparityMap::new(width, height, values).expect("one value per pixel");
    RenderedPair { left, right, disparity, intrinsics: k, baseline_m: BASELINE_M }
}

/// A pair from a rig that is *not* rectified, with its calibration and the
/// exact depth of every left pixel: for testing rectification end to end.
pub struct RigPair {
    pub left: RgbImage,
    pub right: RgbImage,
    pub calibration: crate::calibration::Calibration,
    /// Z (metres, left camera frame) of the surface at each left pixel centre, row-major.
    pub depth: Vec<f64>,
}

/// Renders the room from the left camera as in [`render`] and from a right
/// camera posed by `r` and `t` (OpenCV's convention, `X_r = R X_l + T`, metres),
/// both with the intrinsics of [`Intrinsics::for_size`] and no distortion.
pub fn render_rig(width: u32, height: u32, r: crate::geometry::Mat3, t: crate::geometry::Vec3) -> RigPair {
    use crate::calibration::{Calibration, Camera, Units};
    use crate::geometry;
    let objects = scene();
    let k = Intrinsics::for_size(width, height);
    let to_world = geometry::transpose(&r);
    // The right camera's centre in the left frame: X_r = 0 at X_l = -Rᵀ T.
    let c = geometry::scale(&geometry::mul_vec(&to_world, &t), -1.0);
    let left = render_view(&objects, &k, v(0.0, 0.0, 0.0));
    let right = render_posed_view(&objects, &k, v(c[0], c[1], c[2]), &to_world);
    let mut depth = Vec::with_capacity(width as usize * height as usize);
    for j in 0..height {
        for i in 0..width {
            depth.push(
                cast(&objects, v(0.0, 0.0, 0.0), k.ray(f64::from(i), f64::from(j))).map_or(f64::INFINITY, |hit| hit.t),
            );
        }
    }
    let camera = Camera::pinhole(k.fx, k.fy, k.cx, k.cy);
    let calibration = Calibration {
        image_size: Some([width, height]),
        units: Units::Metres,
        left: camera.clone(),
        right: camera,
        r,
        t,
    };
    RigPair { left, right, calibration, depth }
}

/// The calibration file written next to the images (format in data/README.md):
/// OpenCV's stereo conventions, `X_r = R X_l + T`, units in `units`.
fn calibration_json(k: &Intrinsics, baseline_m: f64) -> String {
    let camera = format!(
        "{{\"K\": [[{fx:?}, 0.0, {cx:?}], [0.0, {fy:?}, {cy:?}], [0.0, 0.0, 1.0]], \"dist\": [0.0, 0.0, 0.0, 0.0, 0.0]}}",
        fx = k.fx,
        fy = k.fy,
        cx = k.cx,
        cy = k.cy
    );
    format!(
        "{{\n  \"image_size\": [{w}, {h}],\n  \"units\": \"m\",\n  \"left\": {camera},\n  \"right\": {camera},\n  \"R\": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],\n  \"T\": [{tx:?}, 0.0, 0.0]\n}}\n",
        w = k.width,
        h = k.height,
        tx = -baseline_m
    )
}

/// Writes left.png, right.png, disp_gt.pfm, disp_gt_kitti16.png, calib.json and
/// a Middlebury-style calib.txt into `dir`.
pub fn write_scene(dir: &Path) -> std::io::Result<()> {
    let pair = render(WIDTH, HEIGHT);
    std::fs::create_dir_all(dir)?;
    let png = |image: &RgbImage| {
        crate::codec::png_bytes(image.as_raw(), image.width(), image.height(), crate::codec::PixelKind::Rgb8)
    };
    std::fs::write(dir.join("left.png"), png(&pair.left))?;
    std::fs::write(dir.join("right.png"), png(&pair.right))?;
    std::fs::write(dir.join("disp_gt.pfm"), pfm::encode(&pair.disparity))?;
    std::fs::write(dir.join("disp_gt_kitti16.png"), kitti::encode_png16(&pair.disparity))?;
    let k = pair.intrinsics;
    std::fs::write(dir.join("calib.json"), calibration_json(&k, pair.baseline_m))?;
    let stats = pair.disparity.stats();
    let cam = format!("[{} 0 {}; 0 {} {}; 0 0 1]", k.fx, k.cx, k.fy, k.cy);
    let middlebury = format!(
        "cam0={cam}\ncam1={cam}\ndoffs=0\nbaseline={}\nwidth={}\nheight={}\nndisp={}\nvmin={}\nvmax={}\n",
        pair.baseline_m * 1000.0,
        k.width,
        k.height,
        (stats.max.ceil() as u32).div_ceil(16) * 16,
        stats.min.floor(),
        stats.max.ceil(),
    );
    std::fs::write(dir.join("calib.txt"), middlebury)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ground_truth_is_f_b_over_depth() {
        let pair = render(64, 48);
        let k = pair.intrinsics;
        assert_eq!((k.fx, k.cx, k.cy), (60.0, 31.5, 23.5));
        // The top-centre pixel looks up past every object at the back wall, 6 m away.
        let wall = f64::from(pair.disparity.get(32, 0));
        assert!((wall - 60.0 * BASELINE_M / 6.0).abs() < 1e-5, "{wall}");
        // The bottom-left pixel sees the floor 0.9 m down: Z = 0.9 fy / (v - cy),
        // so d = B (v - cy) / 0.9 with fx = fy.
        let floor = f64::from(pair.disparity.get(0, 47));
        assert!((floor - BASELINE_M * (47.0 - 23.5) / 0.9).abs() < 1e-5, "{floor}");
        // Every pixel sees something: no infinite disparity.
        assert!(pair.disparity.values().iter().all(|d| d.is_finite() && *d > 0.0));
    }

    #[test]
    fn right_view_matches_left_at_the_true_disparity() {
        // Warping the right image by the ground truth reproduces the left image
        // wherever the point is visible in both views.
        let pair = render(256, 192);
        let (w, h) = (pair.left.width(), pair.left.height());
        let (mut close, mut total) = (0u32, 0u32);
        for y in 0..h {
            for x in 20..w {
                let d = pair.disparity.get(x, y);
                let xr = f64::from(x) - f64::from(d);
                if xr < 1.0 {
                    continue;
                }
                let (x0, t) = (xr.floor() as u32, xr - xr.floor());
                let sample = |c: usize| {
                    lerp(
                        f64::from(pair.right.get_pixel(x0, y).0[c]),
                        f64::from(pair.right.get_pixel(x0 + 1, y).0[c]),
                        t,
                    )
                };
                let diff: f64 = (0..3).map(|c| (sample(c) - f64::from(pair.left.get_pixel(x, y).0[c])).abs()).sum();
                total += 1;
                if diff < 30.0 {
                    close += 1;
                }
            }
        }
        let ratio = f64::from(close) / f64::from(total);
        assert!(ratio > 0.9, "only {:.1} % of pixels agree after warping", 100.0 * ratio);
    }

    #[test]
    fn disparity_range_suits_psmnet() {
        let pair = render(128, 96);
        let stats = pair.disparity.stats();
        // Scaled to 128 px wide, f = 120: wall at 6 m is 2 px, the nearest sphere ~9 px
        // (8 to 36 px at the full 512 px).
        assert!(stats.min > 1.5 && stats.max < 20.0, "{stats:?}");
    }

    #[test]
    fn calibration_file_is_valid_json_with_the_cameras() {
        let k = Intrinsics::for_size(WIDTH, HEIGHT);
        let json: serde_json::Value = serde_json::from_str(&calibration_json(&k, BASELINE_M)).unwrap();
        assert_eq!(json["image_size"], serde_json::json!([512, 384]));
        assert_eq!(json["left"]["K"][0], serde_json::json!([480.0, 0.0, 255.5]));
        assert_eq!(json["right"]["K"][1][2], serde_json::json!(191.5));
        assert_eq!(json["T"], serde_json::json!([-0.1, 0.0, 0.0]));
    }

    #[test]
    fn an_unturned_rig_renders_the_rectified_pair() {
        let rectified = render(64, 48);
        let rig = render_rig(64, 48, crate::geometry::IDENTITY, [-BASELINE_M, 0.0, 0.0]);
        assert_eq!(rig.left, rectified.left);
        assert_eq!(rig.right, rectified.right);
        let z = rig.depth[10 * 64 + 32];
        assert!((f64::from(rectified.disparity.get(32, 10)) - 60.0 * BASELINE_M / z).abs() < 1e-4);
        let turned = render_rig(64, 48, crate::geometry::rodrigues(&[0.0, 0.05, 0.0]), [-BASELINE_M, 0.0, 0.0]);
        assert_eq!(turned.left, rectified.left);
        assert_ne!(turned.right, rectified.right);
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = render(48, 32);
        let b = render(48, 32);
        assert_eq!(a.left, b.left);
        assert_eq!(a.right, b.right);
        assert_eq!(a.disparity, b.disparity);
    }
}
