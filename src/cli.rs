//! What each subcommand does: `serve`, `predict`, `render-synthetic`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

use tokio::net::TcpListener;
use tracing::{error, info};

use crate::api::{AppState, Limits};
use crate::codec::{colormap, kitti, pfm};
use crate::config::{Config, EvalArgs, PredictArgs, RenderArgs};
use crate::decode::decode_rgb;
use crate::engine::{Engine, EngineConfig, EngineError, StereoPair};

/// Runs the server until SIGTERM or Ctrl-C; exits non-zero if the model cannot load.
pub async fn serve(config: Config) -> ExitCode {
    colormap::prepare();
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
        uploads: crate::api::guard::UploadBudget::new(config.max_inflight_bytes),
        origins: crate::api::guard::OriginPolicy { allowed: config.cors_allow_origin.clone() },
        connections: config.connection_limits(),
        connection_stats: Default::default(),
        metrics: Default::default(),
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

/// `predict`: decode, infer with the server's engine, write the requested file.
pub async fn predict(args: PredictArgs) -> Result<String, String> {
    let kind = args.output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if !matches!(kind.as_deref(), Some("pfm" | "png")) {
        return Err(format!("{}: the output must end in .pfm or .png", args.output.display()));
    }
    let depth_kind = args.depth.as_ref().map(|p| p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase));
    if let Some(kind) = &depth_kind {
        if !matches!(kind.as_deref(), Some("pfm" | "png")) {
            return Err("--depth must end in .pfm (float32) or .png (16-bit mm)".into());
        }
    }
    if args.max_depth.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        return Err("--max-depth must be a positive distance".into());
    }
    if args.max_uncertainty.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err("--max-uncertainty must be a positive number of pixels".into());
    }
    if let Some(path) = &args.uncertainty {
        if !path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("pfm")) {
            return Err(format!("{}: --uncertainty writes a float32 PFM: name it .pfm", path.display()));
        }
    }
    let calibration = match &args.calib {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(crate::calibration::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?.0)
        }
        None => None,
    };
    let pair = read_pair(&args.left, &args.right)?;
    let (pair, rectification, colours) = match &calibration {
        Some(calibration) => {
            let (width, height) = pair.dimensions();
            calibration.check_size(width, height).map_err(|e| e.to_string())?;
            let (left, right) = pair.into_images();
            let (left, right, rectification) =
                crate::rectify::rectify_pair(calibration, left, right).map_err(|e| e.to_string())?;
            let colours = left.clone();
            (StereoPair::new(left, right).map_err(|e| e.to_string())?, Some(rectification), Some(colours))
        }
        None => (pair, None, None),
    };

    let engine = Engine::start(args.model.engine_config(1)).map_err(|e| e.to_string())?;
    let info = engine.wait_ready().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let with_uncertainty = args.uncertainty.is_some() || args.max_uncertainty.is_some();
    let prediction =
        if with_uncertainty { engine.predict_with_uncertainty(pair).await } else { engine.predict(pair).await }
            .map_err(|e: EngineError| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let mut map = prediction.disparity;
    let mut uncertainty_note = String::new();
    if let Some(sigma) = &prediction.uncertainty {
        let s = crate::uncertainty::stats(sigma);
        uncertainty_note = format!(
            "\nuncertainty (standard deviation): mean {:.2} median {:.2} p90 {:.2} px",
            s.mean, s.median, s.p90
        );
        if let Some(max) = args.max_uncertainty {
            let (masked, count) = crate::uncertainty::mask(&map, sigma, max);
            map = masked;
            uncertainty_note.push_str(&format!("; {count} pixels above {max} px marked as without value"));
        }
    }

    let write = |path: &std::path::Path, bytes: Vec<u8>| {
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&args.output, if kind.as_deref() == Some("pfm") { pfm::encode(&map) } else { kitti::encode_png16(&map) })?;
    if let Some(path) = &args.color {
        write(path, colormap::color_png(&map))?;
    }
    if let (Some(path), Some(sigma)) = (&args.uncertainty, &prediction.uncertainty) {
        write(path, pfm::encode(sigma))?;
    }
    let stats = map.stats();
    let mut summary = format!(
        "{}: {}x{} disparity, min {:.2} max {:.2} mean {:.2} px, {:.2} s on {}",
        args.output.display(),
        map.width(),
        map.height(),
        stats.min,
        stats.max,
        stats.mean,
        seconds,
        info.device
    );
    summary.push_str(&uncertainty_note);
    if let (Some(rectification), Some(colours)) = (rectification, colours) {
        let mut depth = crate::reconstruct::depth_map(&map, &rectification.camera, args.max_depth);
        if let (Some(sigma), Some(max)) = (&prediction.uncertainty, args.max_uncertainty) {
            depth.mark_uncertain(sigma, max);
        }
        let d = depth.stats(args.max_depth);
        if let (Some(path), Some(kind)) = (&args.depth, &depth_kind) {
            write(path, if kind.as_deref() == Some("pfm") { depth.to_pfm() } else { depth.to_png16_mm() })?;
        }
        let mut points = 0;
        if let Some(path) = &args.ply {
            let to_left = crate::geometry::transpose(&rectification.r_left);
            let cloud = depth.point_cloud(&colours, &to_left);
            points = cloud.len();
            // With the deviation at hand, each point carries it (and its depth's).
            let per_point = prediction.uncertainty.as_ref().map(|sigma| depth.point_uncertainties(sigma));
            write(path, crate::reconstruct::encode_ply_with_uncertainty(&cloud, per_point.as_deref(), d.units))?;
        }
        summary.push_str(&format!(
            "\n{}depth {:.3} to {:.3} {u} (median {:.3} {u}), {} pixels with depth; left out: {} invalid, {} out of view, {} occluded, {} beyond max depth, {} too uncertain{}",
            if rectification.applied { "rectified; " } else { "" },
            d.min,
            d.max,
            d.median,
            d.valid_pixels,
            d.invalid_pixels,
            d.out_of_view_pixels,
            d.occluded_pixels,
            d.beyond_max_depth_pixels,
            d.too_uncertain_pixels,
            if args.ply.is_some() { format!("; {points} points written") } else { String::new() },
            u = d.units,
        ));
    }
    Ok(summary)
}

fn read_pair(left: &std::path::Path, right: &std::path::Path) -> Result<StereoPair, String> {
    let read = |path: &std::path::Path| {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        decode_rgb(&bytes, u64::MAX).map_err(|e| format!("{}: {e}", path.display()))
    };
    StereoPair::new(read(left)?, read(right)?).map_err(|e| e.to_string())
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

/// `eval`: runs every pair found under the given folders and scores it.
pub async fn eval(args: EvalArgs) -> Result<String, String> {
    use crate::eval::{decode_ground_truth, discover_pairs, error_map, Accumulator, ScoredPixels};

    let mut pairs = Vec::new();
    for dir in &args.dirs {
        pairs.extend(discover_pairs(dir).map_err(|e| format!("{}: {e}", dir.display()))?);
    }
    if pairs.is_empty() {
        return Err("no pair folders (with left.* and right.*) found".into());
    }
    let engine = Engine::start(args.model.engine_config(1)).map_err(|e| e.to_string())?;
    let info = engine.wait_ready().await.map_err(|e| e.to_string())?;

    let mut overall = Accumulator::default();
    let mut overall_pixels = ScoredPixels::default();
    let mut reports = Vec::new();
    for files in &pairs {
        let pair = read_pair(&files.left, &files.right)?;
        let (width, height) = pair.dimensions();
        let truth = match &files.ground_truth {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let truth = decode_ground_truth(&bytes, files.gt_scale.or(args.gt_scale), u64::MAX)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if (truth.width(), truth.height()) != (width, height) {
                    return Err(format!(
                        "{}: ground truth is {}x{} but the images are {width}x{height}",
                        path.display(),
                        truth.width(),
                        truth.height()
                    ));
                }
                Some(truth)
            }
            None => None,
        };
        let prediction = engine.predict_with_uncertainty(pair).await.map_err(|e| format!("{}: {e}", files.name))?;
        let map = prediction.disparity;
        let sigma = prediction.uncertainty.ok_or_else(|| format!("{}: the engine gave no uncertainty", files.name))?;
        let metrics = truth.as_ref().map(|truth| {
            let mut acc = Accumulator::default();
            acc.add(&map, truth, args.maxdisp);
            overall.merge(&acc);
            acc.metrics()
        });
        let sparsification = truth.as_ref().and_then(|truth| {
            let mut pixels = ScoredPixels::default();
            pixels.add(&map, &sigma, truth, args.maxdisp);
            overall_pixels.extend(&pixels);
            pixels.sparsification()
        });
        if let Some(out) = &args.save {
            let dir = out.join(&files.name);
            let write = |file: &str, bytes: Vec<u8>| {
                std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(dir.join(file), bytes))
                    .map_err(|e| format!("{}: {e}", dir.join(file).display()))
            };
            write("disparity.pfm", pfm::encode(&map))?;
            write("uncertainty.pfm", pfm::encode(&sigma))?;
            write("disparity_color.png", colormap::color_png(&map))?;
            if let Some(truth) = &truth {
                let errors = error_map(&map, truth);
                write(
                    "error.png",
                    crate::codec::png_bytes(errors.as_raw(), width, height, crate::codec::PixelKind::Rgb8),
                )?;
            }
        }
        reports.push(PairReport {
            name: files.name.clone(),
            left: files.left.display().to_string(),
            width,
            height,
            inference_ms: prediction.inference.as_secs_f64() * 1000.0,
            ground_truth: files.ground_truth.as_ref().map(|p| p.display().to_string()),
            metrics,
            sparsification,
        });
    }
    let overall = (overall.metrics().valid_pixels > 0).then(|| overall.metrics());
    let overall_sparsification = overall_pixels.sparsification();
    if args.json {
        let json = serde_json::json!({
            "model": info.name,
            "device": info.device,
            "maxdisp": args.maxdisp,
            "pairs": reports,
            "overall": overall,
            "overall_sparsification": overall_sparsification,
        });
        return Ok(serde_json::to_string_pretty(&json).expect("report serialises"));
    }
    let mut text = eval_table(&reports, overall.as_ref(), &info.device, args.maxdisp);
    text.push_str(&sparsification_table(&reports, overall_sparsification.as_ref()));
    Ok(text)
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
