//! What each subcommand does: `serve`, `predict`, `eval`, `batch`,
//! `render-synthetic`. `predict`, `eval` and `batch` only translate files
//! (and video frames) into pipeline requests and its outcomes into files and
//! tables.

pub mod batch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use tokio::net::TcpListener;
use tracing::{error, info};

use bytes::Bytes;

use crate::api::{AppState, Limits};
use crate::calibration::{Calibration, CalibrationFormat};
use crate::codec::colormap;
use crate::config::{Config, EvalArgs, PredictArgs, RenderArgs};
use crate::engine::{Engine, EngineConfig};
use crate::pipeline::{EncodedAnswer, Options, Outcome, OutputFormat, PairInput, Pipeline, Request, UploadBudget};

/// Runs the server until SIGTERM or Ctrl-C; exits non-zero if the model cannot load.
pub async fn serve(config: Config) -> ExitCode {
    colormap::prepare();
    let cpu_threads = crate::pipeline::pool::init(config.cpu_threads);
    info!(cpu_threads, "CPU pool ready");
    let api_keys = match crate::api::auth::ApiKeys::load(&config.api_keys, config.api_key_file.as_deref()) {
        Ok(keys) => keys,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if api_keys.enabled() {
        info!("API keys required on every route but health, readiness, metrics and the page");
    }
    let engine_config =
        EngineConfig { warm_sizes: config.warm_sizes.clone(), ..config.model.engine_config(config.queue_depth) };
    let engine = match Engine::start(engine_config) {
        Ok(engine) => engine,
        Err(e) => {
            error!("cannot start the engine thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = AppState {
        engine: engine.clone(),
        limits: Limits {
            max_upload_bytes: config.max_upload_bytes,
            max_pixels: config.max_pixels,
            upload_timeout: std::time::Duration::from_secs(config.upload_timeout_secs),
        },
        static_dir: config.static_dir.clone(),
        data_dir: config.data_dir.clone(),
        uploads: UploadBudget::new(config.max_inflight_bytes),
        origins: crate::api::guard::OriginPolicy { allowed: config.cors_allow_origin.clone() },
        connections: config.connection_limits(),
        connection_stats: Default::default(),
        metrics: Default::default(),
        api_keys,
        streams: crate::api::stream::Streams::new(
            config.max_streams.max(1),
            std::time::Duration::from_secs(config.stream_idle_timeout_secs.max(1)),
        ),
    };
    let address = SocketAddr::new(config.host, config.port);
    let listener = match TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(e) => {
            error!("cannot listen on {address}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener.local_addr().unwrap_or(address);
    info!("listening on http://{bound} (health turns 200 once the model is warm)");

    // Stop serving on a signal, or when the model turns out unloadable: a
    // server that can never answer should fail loudly, not idle with 503s.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load_failed = {
        let stop = stop_tx.clone();
        let engine = engine.clone();
        tokio::spawn(async move {
            match engine.wait_ready().await {
                Ok(info) => {
                    info!(device = %info.device, "model ready");
                    false
                }
                Err(e) => {
                    error!("{e}");
                    let _ = stop.send(true);
                    true
                }
            }
        })
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down: finishing requests in flight");
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx;
    let shutdown = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    if let Err(e) = crate::serve(listener, state, shutdown).await {
        error!("server error: {e}");
        return ExitCode::FAILURE;
    }
    if load_failed.is_finished() && load_failed.await.unwrap_or(false) {
        return ExitCode::FAILURE;
    }
    info!("stopped");
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `predict`: one pair through the pipeline, each asked output written to its file.
pub async fn predict(args: PredictArgs) -> Result<String, String> {
    let outputs = predict_outputs(&args)?;
    let calibration = args.calib.as_deref().map(read_calibration).transpose()?;
    let options = Options {
        formats: outputs.iter().map(|(format, _)| *format).collect(),
        max_depth: args.max_depth,
        max_uncertainty: args.max_uncertainty,
        // With the deviation at hand, each point carries it (and its depth's).
        ply_uncertainty: args.ply.is_some() && (args.uncertainty.is_some() || args.max_uncertainty.is_some()),
        uncertainty: args.uncertainty.is_some(),
        ..Options::default()
    };
    let pair = read_pair_files(&args.left, &args.right)?;
    let pipeline = start_pipeline(&args.model, 1).await?;
    let request = Request { pair, ground_truth: None, calibration, options, started: Instant::now(), receiving: None };
    let outcome = pipeline.run(request).await.map_err(|e| e.to_string())?;
    for (format, path) in &outputs {
        let answer = outcome.answer(*format).expect("every format asked is answered");
        let EncodedAnswer::File { bytes, .. } = &answer.body else { unreachable!("predict asks for files only") };
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(predict_summary(&args, &outcome))
}

/// The files `predict` writes, each with its format.
fn predict_outputs(args: &PredictArgs) -> Result<Vec<(OutputFormat, PathBuf)>, String> {
    let extension = |path: &Path| path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    check_limits(args.max_depth, args.max_uncertainty)?;
    let main = match extension(&args.output).as_deref() {
        Some("pfm") => OutputFormat::Pfm,
        Some("png") => OutputFormat::Png16,
        _ => return Err(format!("{}: the output must end in .pfm or .png", args.output.display())),
    };
    let mut outputs = vec![(main, args.output.clone())];
    if let Some(path) = &args.color {
        outputs.push((OutputFormat::Color, path.clone()));
    }
    if let Some(path) = &args.uncertainty {
        if extension(path).as_deref() != Some("pfm") {
            return Err(format!("{}: --uncertainty writes a float32 PFM: name it .pfm", path.display()));
        }
        outputs.push((OutputFormat::Uncertainty, path.clone()));
    }
    if let Some(path) = &args.depth {
        let format = match extension(path).as_deref() {
            Some("pfm") => OutputFormat::Depth,
            Some("png") => OutputFormat::Depth16,
            _ => return Err("--depth must end in .pfm (float32) or .png (16-bit mm)".into()),
        };
        outputs.push((format, path.clone()));
    }
    if let Some(path) = &args.ply {
        outputs.push((OutputFormat::Ply, path.clone()));
    }
    if args.calib.is_none() && (args.depth.is_some() || args.ply.is_some()) {
        return Err("--depth and --ply need the pair's calibration: add --calib FILE".into());
    }
    Ok(outputs)
}

/// What `predict` prints: the disparity's range, the time, and with a
/// calibration the depth's figures.
fn predict_summary(args: &PredictArgs, outcome: &Outcome) -> String {
    let (_, first) = &outcome.answers[0];
    let stats = first.stats;
    let seconds = (outcome.timings.queue_ms + outcome.timings.inference_ms) / 1000.0;
    let device = outcome.model.as_ref().map_or("", |m| m.device.as_str());
    let mut summary = format!(
        "{}: {}x{} disparity, min {:.2} max {:.2} mean {:.2} px, {seconds:.2} s on {device}",
        args.output.display(),
        outcome.disparity.width(),
        outcome.disparity.height(),
        stats.min,
        stats.max,
        stats.mean,
    );
    if let Some(sigma) = &outcome.uncertainty {
        let s = crate::uncertainty::stats(sigma);
        summary.push_str(&format!(
            "\nuncertainty (standard deviation): mean {:.2} median {:.2} p90 {:.2} px",
            s.mean, s.median, s.p90
        ));
        if let (Some(max), Some(count)) = (args.max_uncertainty, first.masked_pixels) {
            summary.push_str(&format!("; {count} pixels above {max} px marked as without value"));
        }
    }
    let depth = outcome.answers.iter().find_map(|(_, a)| a.depth.as_ref());
    if let Some(d) = depth {
        let points = outcome.answers.iter().find_map(|(_, a)| a.points);
        summary.push_str(&format!(
            "\n{}depth {:.3} to {:.3} {u} (median {:.3} {u}), {} pixels with depth; left out: {} invalid, {} out of view, {} occluded, {} beyond max depth, {} too uncertain{}",
            if outcome.rectified == Some(true) { "rectified; " } else { "" },
            d.min,
            d.max,
            d.median,
            d.valid_pixels,
            d.invalid_pixels,
            d.out_of_view_pixels,
            d.occluded_pixels,
            d.beyond_max_depth_pixels,
            d.too_uncertain_pixels,
            points.map(|n| format!("; {n} points written")).unwrap_or_default(),
            u = d.units,
        ));
    }
    summary
}

/// `--max-depth` and `--max-uncertainty`, checked as every command takes them.
fn check_limits(max_depth: Option<f64>, max_uncertainty: Option<f32>) -> Result<(), String> {
    if max_depth.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        return Err("--max-depth must be a positive distance".into());
    }
    if max_uncertainty.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err("--max-uncertainty must be a positive number of pixels".into());
    }
    Ok(())
}

/// A calibration file, any format [`crate::calibration::parse`] reads.
fn read_calibration(path: &Path) -> Result<(Calibration, CalibrationFormat), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::calibration::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The engine for a command-line run, loaded and warmed, behind a pipeline
/// without the server's limits (the files are the user's own); `in_flight`
/// pairs may wait for it at once.
async fn start_pipeline(model: &crate::config::ModelArgs, in_flight: usize) -> Result<Pipeline, String> {
    let engine = Engine::start(model.engine_config(in_flight)).map_err(|e| e.to_string())?;
    engine.wait_ready().await.map_err(|e| e.to_string())?;
    Ok(Pipeline { engine, budget: UploadBudget::new(u64::MAX), max_pixels: u64::MAX })
}

/// A pair of image files, read and their headers checked (so a mismatched
/// pair fails before the model loads; decoding is the pipeline's).
fn read_pair_files(left: &Path, right: &Path) -> Result<PairInput, String> {
    let read = |path: &Path| std::fs::read(path).map(Bytes::from).map_err(|e| format!("{}: {e}", path.display()));
    let (left_bytes, right_bytes) = (read(left)?, read(right)?);
    crate::decode::probe_pair(&left_bytes, &right_bytes, u64::MAX).map_err(|e| match e {
        crate::decode::PairError::Left(e) => format!("{}: {e}", left.display()),
        crate::decode::PairError::Right(e) => format!("{}: {e}", right.display()),
        mismatch => mismatch.to_string(),
    })?;
    Ok(PairInput::Files { left: left_bytes, right: right_bytes })
}

/// One evaluated pair, as `eval --json` prints it.
#[derive(Debug, serde::Serialize)]
struct PairReport {
    name: String,
    left: String,
    width: u32,
    height: u32,
    inference_ms: f64,
    ground_truth: Option<String>,
    metrics: Option<crate::eval::Metrics>,
    /// How well the per-pixel deviation ranks the errors (with ground truth only).
    sparsification: Option<crate::eval::Sparsification>,
}

/// `eval`: runs every pair found under the given folders through the
/// pipeline (with its ground truth and the deviation) and scores it.
pub async fn eval(args: EvalArgs) -> Result<String, String> {
    use crate::eval::{Accumulator, ScoredPixels};

    let mut pairs = Vec::new();
    for dir in &args.dirs {
        pairs.extend(crate::dataset::discover(dir).map_err(|e| format!("{}: {e}", dir.display()))?);
    }
    if pairs.is_empty() {
        return Err("no stereo pairs found (KITTI, Middlebury, left/ + right/ or pair folders)".into());
    }
    if let Some(problem) = args.scale.and_then(crate::pipeline::scale_problem) {
        return Err(format!("--{}", problem.replacen('=', " ", 1)));
    }
    let scale = args.scale.filter(|&s| s < 1.0);
    let pipeline = start_pipeline(&args.model, 1).await?;
    let formats = if args.save.is_some() {
        vec![OutputFormat::Pfm, OutputFormat::Uncertainty, OutputFormat::Color]
    } else {
        vec![]
    };

    let mut overall = Accumulator::default();
    let mut overall_pixels = ScoredPixels::default();
    let mut reports = Vec::new();
    let mut device = String::new();
    for files in &pairs {
        let ground_truth = match &files.ground_truth {
            Some(path) => Some(std::fs::read(path).map(Bytes::from).map_err(|e| format!("{}: {e}", path.display()))?),
            None => None,
        };
        let gt_scale = files.gt_scale.or(args.gt_scale);
        // Downscaled: the pipeline runs without the ground truth, which is then decoded here and
        // scored at its own size against the prediction upscaled to it.
        let full_size_truth = match (scale, &ground_truth) {
            (Some(_), Some(bytes)) => Some(
                crate::eval::decode_ground_truth(bytes, gt_scale, pipeline.max_pixels)
                    .map_err(|e| format!("{}: the ground truth: {e}", files.name))?,
            ),
            _ => None,
        };
        let request = Request {
            pair: read_pair_files(&files.left, &files.right)?,
            ground_truth: if scale.is_some() { None } else { ground_truth },
            calibration: None,
            options: Options { formats: formats.clone(), gt_scale, uncertainty: true, scale, ..Options::default() },
            started: Instant::now(),
            receiving: None,
        };
        let outcome = pipeline.run(request).await.map_err(|e| format!("{}: {e}", files.name))?;
        device = outcome.model.as_ref().map_or(String::new(), |m| m.device.clone());
        let sigma =
            outcome.uncertainty.as_ref().ok_or_else(|| format!("{}: the engine gave no uncertainty", files.name))?;
        let upscaled = full_size_truth.as_ref().map(|truth| {
            (outcome.disparity.upscaled(truth.width(), truth.height()), sigma.upscaled(truth.width(), truth.height()))
        });
        let (map, sigma) = match &upscaled {
            Some((map, sigma)) => (map, sigma),
            None => (&outcome.disparity, sigma),
        };
        let truth = full_size_truth.as_ref().or(outcome.truth.as_ref());
        let masked = match (&files.mask, truth) {
            (Some(mask), Some(truth)) => {
                let bytes = std::fs::read(mask).map_err(|e| format!("{}: {e}", mask.display()))?;
                Some(crate::eval::apply_mask(truth, &bytes).map_err(|e| format!("{}: {e}", mask.display()))?)
            }
            _ => None,
        };
        let truth = masked.as_ref().or(truth);
        let metrics = truth.map(|truth| {
            let mut acc = Accumulator::default();
            acc.add(map, truth, args.maxdisp);
            overall.merge(&acc);
            acc.metrics()
        });
        let sparsification = truth.and_then(|truth| {
            let mut pixels = ScoredPixels::default();
            pixels.add(map, sigma, truth, args.maxdisp);
            overall_pixels.extend(&pixels);
            pixels.sparsification()
        });
        if let Some(out) = &args.save {
            save_eval_outputs(&out.join(&files.name), &outcome)?;
        }
        reports.push(PairReport {
            name: files.name.clone(),
            left: files.left.display().to_string(),
            width: map.width(),
            height: map.height(),
            inference_ms: outcome.timings.inference_ms,
            ground_truth: files.ground_truth.as_ref().map(|p| p.display().to_string()),
            metrics,
            sparsification,
        });
    }
    let overall = (overall.metrics().valid_pixels > 0).then(|| overall.metrics());
    let overall_sparsification = overall_pixels.sparsification();
    if args.json {
        let model = pipeline.engine.wait_ready().await.map_err(|e| e.to_string())?;
        let json = serde_json::json!({
            "model": model.name,
            "device": device,
            "maxdisp": args.maxdisp,
            "pairs": reports,
            "overall": overall,
            "overall_sparsification": overall_sparsification,
        });
        return Ok(serde_json::to_string_pretty(&json).expect("report serialises"));
    }
    let mut text = eval_table(&reports, overall.as_ref(), &device, args.maxdisp);
    text.push_str(&sparsification_table(&reports, overall_sparsification.as_ref()));
    Ok(text)
}

/// `eval --save`: a pair's disparity, deviation and colour image, and its error map.
fn save_eval_outputs(dir: &Path, outcome: &Outcome) -> Result<(), String> {
    let write = |file: &str, bytes: &[u8]| {
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(dir.join(file), bytes))
            .map_err(|e| format!("{}: {e}", dir.join(file).display()))
    };
    for (format, file) in [
        (OutputFormat::Pfm, "disparity.pfm"),
        (OutputFormat::Uncertainty, "uncertainty.pfm"),
        (OutputFormat::Color, "disparity_color.png"),
    ] {
        if let Some(EncodedAnswer::File { bytes, .. }) = outcome.answer(format).map(|a| &a.body) {
            write(file, bytes)?;
        }
    }
    if let Some(truth) = &outcome.truth {
        let errors = crate::eval::error_map(&outcome.disparity, truth);
        let (width, height) = errors.dimensions();
        write("error.png", &crate::codec::png_bytes(errors.as_raw(), width, height, crate::codec::PixelKind::Rgb8))?;
    }
    Ok(())
}

/// The second table of `eval`: error over the most certain pixels, by the
/// network's per-pixel standard deviation (see [`crate::eval::Sparsification`]).
fn sparsification_table(reports: &[PairReport], overall: Option<&crate::eval::Sparsification>) -> String {
    let mut out = String::from(
        "\n\nUncertainty: error over the most certain pixels (by standard deviation), area under the \
         sparsification curve (oracle: by true error), calibration\n\n\
         | pair | EPE 100/90/80/50 % | D1 % 100/90/80/50 % | D1 80 % / all | AUC EPE (oracle) | AUC D1 (oracle) | \
         error <= 1 / 2 sigma % |\n|---|---|---|---|---|---|---|\n",
    );
    let row = |name: &str, s: &crate::eval::Sparsification| {
        let join =
            |f: &dyn Fn(&crate::eval::KeptMetrics) -> String| s.kept.iter().map(f).collect::<Vec<_>>().join(" / ");
        let ratio = match (s.kept.first(), s.kept.iter().find(|k| k.fraction == 0.8)) {
            (Some(all), Some(kept)) if all.d1 > 0.0 => format!("{:.2}", kept.d1 / all.d1),
            _ => "-".into(),
        };
        format!(
            "| {name} | {} | {} | {ratio} | {:.3} ({:.3}) | {:.2} ({:.2}) | {:.1} / {:.1} |\n",
            join(&|k| format!("{:.3}", k.epe)),
            join(&|k| format!("{:.2}", k.d1)),
            s.auc_epe,
            s.oracle_auc_epe,
            s.auc_d1,
            s.oracle_auc_d1,
            s.within_1_sigma,
            s.within_2_sigma
        )
    };
    for r in reports {
        if let Some(s) = &r.sparsification {
            out.push_str(&row(&r.name, s));
        }
    }
    if let Some(s) = overall {
        out.push_str(&row("**all (pixels pooled)**", s));
    }
    out
}

fn eval_table(reports: &[PairReport], overall: Option<&crate::eval::Metrics>, device: &str, maxdisp: f32) -> String {
    let mut out = format!(
        "| pair | size | valid px | excluded (gt >= {maxdisp}) | EPE px | D1 % | bad-1 % | bad-2 % | bad-3 % | time s |\n"
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let row = |name: &str, size: String, m: Option<&crate::eval::Metrics>, seconds: String| match m {
        Some(m) => format!(
            "| {name} | {size} | {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {seconds} |\n",
            m.valid_pixels, m.excluded_pixels, m.epe, m.d1, m.bad1, m.bad2, m.bad3
        ),
        None => format!("| {name} | {size} | no ground truth | | | | | | | {seconds} |\n"),
    };
    for r in reports {
        out.push_str(&row(
            &r.name,
            format!("{}x{}", r.width, r.height),
            r.metrics.as_ref(),
            format!("{:.2}", r.inference_ms / 1000.0),
        ));
    }
    if let Some(m) = overall {
        let total: f64 = reports.iter().map(|r| r.inference_ms).sum::<f64>() / 1000.0;
        out.push_str(&row("**all (pixels pooled)**", String::new(), Some(m), format!("{total:.2}")));
    }
    out.push_str(&format!("\n{} pair(s) on {device}", reports.len()));
    out
}

/// `render-synthetic`: writes the sample scene.
pub fn render_synthetic(args: RenderArgs) -> Result<String, String> {
    crate::synthetic::write_scene(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    Ok(format!("wrote the synthetic scene to {}", args.output.display()))
}
