//! Does the Rust service compute the right numbers? Known shifts, parity with
//! the eager PyTorch reference, and the synthetic scene's exact ground truth.

mod common;

use common::*;
use stereo_recon::codec::pfm;
use stereo_recon::decode::decode_rgb;
use stereo_recon::disparity::DisparityMap;
use stereo_recon::engine::{Engine, EngineConfig, MemoryFormat, StereoPair};

fn pair_from_png(left: &[u8], right: &[u8]) -> StereoPair {
    StereoPair::new(decode_rgb(left, u64::MAX).unwrap(), decode_rgb(right, u64::MAX).unwrap()).unwrap()
}

async fn predict(engine: &Engine, left: &[u8], right: &[u8]) -> DisparityMap {
    engine.predict(pair_from_png(left, right)).await.expect("inference succeeds").disparity
}

#[tokio::test]
async fn a_uniform_shift_gives_that_disparity_in_the_interior() {
    let engine = ready_engine(1).await;
    for shift in [9u32, 23] {
        let (left, right) = shifted_pair(272, 256, shift);
        let map = predict(&engine, &png(&left), &png(&right)).await;
        // Interior: left pixels whose match lies inside the right image, away from borders.
        let margin = 16;
        let mut errors = Vec::new();
        for y in margin..map.height() - margin {
            for x in shift + margin..map.width() - margin {
                errors.push((map.get(x, y) - shift as f32).abs());
            }
        }
        let mean = errors.iter().sum::<f32>() / errors.len() as f32;
        let within = errors.iter().filter(|e| **e <= 1.0).count() as f32 / errors.len() as f32;
        println!("shift {shift}: mean |error| {mean:.3} px, {:.1} % within 1 px", within * 100.0);
        assert!(mean < 1.0, "shift {shift}: mean error {mean} px");
        assert!(within > 0.95, "shift {shift}: only {:.1} % of interior pixels within 1 px", within * 100.0);
    }
}

#[tokio::test]
async fn rust_output_matches_eager_pytorch() {
    let fixture = |name: &str| {
        let path = repo().join("models/parity").join(name);
        pfm::decode(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make parity-fixtures`)", path.display())),
        )
        .unwrap()
    };
    let engine = ready_engine(1).await;
    let (left, right) = fixture_pair();
    let prediction = engine.predict_with_uncertainty(pair_from_png(&left, &right)).await.expect("inference succeeds");
    let deviation = prediction.uncertainty.expect("asked for the uncertainty");
    // Both outputs: the disparity, and its standard deviation from the same distribution.
    for (what, ours, reference) in [
        ("disparity", &prediction.disparity, fixture("synthetic_crop.pfm")),
        ("standard deviation", &deviation, fixture("synthetic_crop_uncertainty.pfm")),
    ] {
        assert_eq!((ours.width(), ours.height()), (reference.width(), reference.height()));
        let diffs: Vec<f32> = ours.values().iter().zip(reference.values()).map(|(a, b)| (a - b).abs()).collect();
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let max = diffs.iter().copied().fold(0.0, f32::max);
        println!("parity with eager PyTorch, {what}: mean |diff| {mean:.2e} px, max {max:.2e} px");
        assert!(mean < 0.01, "{what}: mean |diff| {mean} px");
        assert!(max < 0.5, "{what}: max |diff| {max} px");
    }
    // Asking for the deviation does not change the disparity.
    let plain = predict(&engine, &left, &right).await;
    let drift =
        plain.values().iter().zip(prediction.disparity.values()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(drift < 1e-3, "disparity with and without the deviation differs by {drift} px");
}

/// The deviation says where the answer is ambiguous: on a pair where a band of
/// the left image is occluded in the right one (the right camera sees other,
/// unrelated texture there), the band's pixels have no true match and must be
/// far less certain than the textured rest.
#[tokio::test]
async fn the_deviation_is_high_where_the_match_is_ambiguous() {
    let (width, height, shift) = (320u32, 256u32, 12u32);
    let (left, mut right) = shifted_pair(width, height, shift);
    // Left columns 150..250 would match right columns 138..238: replace those with
    // texture from elsewhere in the scene (rows 300 lower, mirrored).
    let band = 150..250u32;
    let source = image::load_from_memory(&read_png("data/synthetic/left.png")).unwrap().to_rgb8();
    for y in 0..height {
        for x in band.clone() {
            let (sx, sy) = (source.width() - 1 - (x + 40), (y + 20) % source.height());
            right.put_pixel(x - shift, y, *source.get_pixel(sx, sy));
        }
    }
    let engine = ready_engine(1).await;
    let prediction =
        engine.predict_with_uncertainty(pair_from_png(&png(&left), &png(&right))).await.expect("inference succeeds");
    let sigma = prediction.uncertainty.expect("asked for the uncertainty");
    assert_eq!((sigma.width(), sigma.height()), (width, height));
    assert!(sigma.values().iter().all(|s| s.is_finite() && *s >= 0.0), "deviations are finite, non-negative px");
    let mean_over = |xs: std::ops::Range<u32>| {
        let values: Vec<f32> =
            (16..height - 16).flat_map(|y| xs.clone().map(move |x| (x, y))).map(|(x, y)| sigma.get(x, y)).collect();
        values.iter().sum::<f32>() / values.len() as f32
    };
    // The band's interior, away from its textured edges; textured columns well away from it.
    let ambiguous = mean_over(band.start + 24..band.end - 24);
    let textured = mean_over(40..100);
    println!("mean deviation: ambiguous band {ambiguous:.2} px, textured {textured:.2} px");
    assert!(ambiguous > 2.0 * textured, "band {ambiguous} px vs textured {textured} px");
}

#[tokio::test]
async fn channels_last_weights_give_the_same_disparity() {
    // The CPU default re-lays the convolution weights channels-last for speed;
    // the answer must not change beyond float rounding.
    let (left, right) = fixture_pair();
    let mut maps = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let config = EngineConfig { memory_format: format, ..engine_config(model_path(), 1) };
        let engine = Engine::start(config).unwrap();
        let info = engine.wait_ready().await.unwrap();
        assert_eq!(info.memory_format, if format == MemoryFormat::Contiguous { "contiguous" } else { "channels-last" });
        maps.push(predict(&engine, &left, &right).await);
    }
    let diffs: Vec<f32> = maps[0].values().iter().zip(maps[1].values()).map(|(a, b)| (a - b).abs()).collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = diffs.iter().copied().fold(0.0, f32::max);
    println!("contiguous vs channels-last: mean |diff| {mean:.2e} px, max {max:.2e} px");
    assert!(mean < 1e-3 && max < 0.05, "mean {mean}, max {max}");
}

#[tokio::test]
async fn synthetic_scene_is_recovered_with_small_error() {
    let engine = ready_engine(1).await;
    let truth = pfm::decode(&read_png("data/synthetic/disp_gt.pfm")).unwrap();
    let map = predict(&engine, &read_png("data/synthetic/left.png"), &read_png("data/synthetic/right.png")).await;
    let (mut sum, mut bad, mut n) = (0.0f64, 0usize, 0usize);
    for (p, t) in map.values().iter().zip(truth.values()) {
        if t.is_finite() && *t < 192.0 {
            let e = (p - t).abs();
            sum += f64::from(e);
            bad += usize::from(e > 3.0 && e > 0.05 * t);
            n += 1;
        }
    }
    let epe = sum / n as f64;
    let d1 = 100.0 * bad as f64 / n as f64;
    println!("synthetic scene: EPE {epe:.3} px, D1 {d1:.2} % over {n} pixels");
    assert!(epe < 1.0, "EPE {epe}");
    assert!(d1 < 5.0, "D1 {d1} %");
}

#[test]
fn committed_synthetic_data_is_what_the_renderer_produces() {
    let dir = std::env::temp_dir().join(format!("stereo-recon-synthetic-{}", std::process::id()));
    stereo_recon::synthetic::write_scene(&dir).unwrap();
    for file in ["left.png", "right.png"] {
        let fresh = image::open(dir.join(file)).unwrap().to_rgb8();
        let committed = image::open(repo().join("data/synthetic").join(file)).unwrap().to_rgb8();
        assert_eq!(fresh, committed, "{file} differs from a fresh render: run `make synthetic`");
    }
    let fresh = pfm::decode(&std::fs::read(dir.join("disp_gt.pfm")).unwrap()).unwrap();
    let committed = pfm::decode(&read_png("data/synthetic/disp_gt.pfm")).unwrap();
    assert_eq!(fresh, committed);
    for file in ["calib.json", "calib.txt"] {
        let fresh = std::fs::read_to_string(dir.join(file)).unwrap();
        let committed = std::fs::read_to_string(repo().join("data/synthetic").join(file)).unwrap();
        assert_eq!(fresh, committed, "{file}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The precision option's accuracy budget (docs/performance.md, "Precision"): bf16 on every
/// pair with ground truth in `../shared/stereo` (when present) and `data/`,
/// against fp32 on the same pair: EPE within 0.01 px and mean |bf16 - fp32|
/// below 0.05 px. On a CPU without fast bf16 kernels (AVX2 only, like the CI
/// machines) the engine refuses bf16 at load, and this checks that refusal
/// and its reason instead: there one bf16 pass would take hours.
#[tokio::test]
async fn bf16_stays_within_the_accuracy_budget_on_every_pair() {
    use stereo_recon::dataset::discover;
    use stereo_recon::engine::Precision;
    use stereo_recon::eval::{decode_ground_truth, evaluate, DEFAULT_MAXDISP};

    let probe = Engine::start(EngineConfig { precision: Precision::Bf16, ..engine_config(model_path(), 1) }).unwrap();
    if let Err(why) = probe.wait_ready().await {
        let why = why.to_string();
        assert!(why.contains("no fast bf16 kernels") && why.contains("fp32"), "{why}");
        println!("bf16 not measured on this CPU: {why}");
        return;
    }
    drop(probe);

    let mut pairs = Vec::new();
    for root in [repo().join("../shared/stereo"), repo().join("data")] {
        if root.is_dir() {
            pairs.extend(discover(&root).unwrap().into_iter().filter(|p| p.ground_truth.is_some()));
        }
    }
    assert!(!pairs.is_empty(), "no pair with ground truth found");
    let mut engines = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let engine = Engine::start(EngineConfig { precision, ..engine_config(model_path(), 1) }).unwrap();
        let info = engine.wait_ready().await.expect("the model loads in this precision");
        assert_eq!(info.precision, precision.to_string());
        engines.push(engine);
    }
    for files in &pairs {
        let (left, right) = (std::fs::read(&files.left).unwrap(), std::fs::read(&files.right).unwrap());
        let truth_path = files.ground_truth.as_ref().unwrap();
        let truth = decode_ground_truth(&std::fs::read(truth_path).unwrap(), files.gt_scale, u64::MAX).unwrap();
        let fp32 = predict(&engines[0], &left, &right).await;
        let bf16 = predict(&engines[1], &left, &right).await;
        let (epe32, epe16) =
            (evaluate(&fp32, &truth, DEFAULT_MAXDISP).epe, evaluate(&bf16, &truth, DEFAULT_MAXDISP).epe);
        let diffs: Vec<f64> = fp32.values().iter().zip(bf16.values()).map(|(a, b)| f64::from((a - b).abs())).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        println!(
            "{} ({}x{}): EPE fp32 {epe32:.5} bf16 {epe16:.5} px (change {:+.5}); mean |bf16 - fp32| {mean:.4} px",
            files.name,
            fp32.width(),
            fp32.height(),
            epe16 - epe32
        );
        assert!((epe16 - epe32).abs() <= 0.01, "{}: EPE {epe32} -> {epe16}", files.name);
        assert!(mean < 0.05, "{}: mean |bf16 - fp32| = {mean} px", files.name);
    }
}

#[tokio::test]
async fn fp16_on_the_cpu_is_refused_with_a_clear_reason() {
    use stereo_recon::engine::Precision;
    let engine = Engine::start(EngineConfig { precision: Precision::Fp16, ..engine_config(model_path(), 1) }).unwrap();
    let why = engine.wait_ready().await.expect_err("fp16 must not load on the CPU").to_string();
    assert!(why.contains("fp16") && why.contains("CPU") && why.contains("bf16"), "{why}");
}
