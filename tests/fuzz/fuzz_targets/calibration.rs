//! Whatever text a client sends as a calibration, reading, validating and
//! rectifying must return a value or a clean error: no panic, and a
//! calibration that passes validation yields a usable rectification or an error.
#![no_main]

use image::{Rgb, Rgb32FImage};
use libfuzzer_sys::fuzz_target;
use stereo_recon::calibration::parse;
use stereo_recon::rectify::rectify_pair;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok((calibration, _)) = parse(text) else { return };
    // A tiny pair at the calibration's size (when it is small) or 24x16.
    let (w, h) = match calibration.image_size {
        Some([w, h]) if u64::from(w) * u64::from(h) <= 4096 => (w, h),
        _ => (24, 16),
    };
    let image = Rgb32FImage::from_pixel(w, h, Rgb([0.5, 0.25, 1.0]));
    if let Ok((left, right, rectification)) = rectify_pair(&calibration, image.clone(), image) {
        assert_eq!(left.dimensions(), (w, h));
        assert_eq!(right.dimensions(), (w, h));
        assert!(left.as_raw().iter().all(|v| (0.0..=1.0).contains(v)), "resampling left [0, 1]");
        assert!(rectification.camera.baseline > 0.0 || rectification.camera.baseline.is_nan());
    }
});
