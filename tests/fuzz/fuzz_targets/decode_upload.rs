//! Whatever bytes a client uploads, as an image or as ground truth, decoding
//! and validation must return a value or a clean error: no panic, no
//! unbounded allocation, and decoded images that respect the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stereo_recon::decode::decode_rgb;
use stereo_recon::eval::decode_ground_truth;
use stereo_recon::preprocess::{normalise_and_pad, PadRule};

/// Small enough that libFuzzer's 2 GB RSS limit is never the finding.
const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = decode_rgb(data, MAX_PIXELS) {
        let (w, h) = image.dimensions();
        assert!(w > 0 && h > 0 && u64::from(w) * u64::from(h) <= MAX_PIXELS);
        assert!(image.as_raw().iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)), "RGB outside [0, 1]");
        let geometry = PadRule::PSMNET.geometry(w, h);
        assert!(geometry.padded_width >= w && geometry.padded_height >= h);
        assert_eq!(geometry.padded_width % 16, 0);
        assert_eq!(geometry.padded_height % 16, 0);
        if geometry.padded_len() <= 1 << 18 {
            let input = normalise_and_pad(&image, &geometry);
            assert_eq!(input.len(), 3 * geometry.padded_len());
        }
    }
    if let Ok(truth) = decode_ground_truth(data, Some(4.0), MAX_PIXELS) {
        // A PFM cannot declare more values than its bytes hold.
        let values = truth.width() as usize * truth.height() as usize;
        assert_eq!(truth.values().len(), values);
        assert!(values <= data.len() / 4 || values as u64 <= MAX_PIXELS);
    }
});
