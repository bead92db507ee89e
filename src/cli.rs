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
    let prediction = engine.predict(pair).await.map_err(|e: EngineError| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let map = prediction.disparity;

    let write = |path: &std::path::Path, bytes: Vec<u8>| {
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&args.output, if kind.as_deref() == Some("pfm") { pfm::encode(&map) } else { kitti::encode_png16(&map) })?;
    if let Some(path) = &args.color {
        write(path, colormap::color_png(&map))?;
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
    if let (Some(rectification), Some(colours)) = (rectification, colours) {
        let depth = crate::reconstruct::depth_map(&map, &rectification.camera, args.max_depth);
        let d = depth.stats(args.max_depth);
        if let (Some(path), Some(kind)) = (&args.depth, &depth_kind) {
            write(path, if kind.as_deref() == Some("pfm") { depth.to_pfm() } else { depth.to_png16_mm() })?;
        }
        let mut points = 0;
        if let Some(path) = &args.ply {
            let to_left = crate::geometry::transpose(&rectification.r_left);
            let cloud = depth.point_cloud(&colours, &to_left);
            points = cloud.len();
            write(path, crate::reconstruct::encode_ply(&cloud, d.units))?;
        }
        summary.push_str(&format!(
            "\n{}depth {:.3} to {:.3} {u} (median {:.3} {u}), {} pixels with depth; left out: {} invalid, {} out of view, {} occluded, {} beyond max depth{}",
            if rectification.applied { "rectified; " } else { "" },
            d.min,
            d.max,
            d.median,
            d.valid_pixels,
            d.invalid_pixels,
            d.out_of_view_pixels,
            d.occluded_pixels,
            d.beyond_max_depth_pixels,
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
}

/// `eval`: runs every pair found under the given folders and scores it.
pub async fn eval(args: EvalArgs) -> Result<String, String> {
    use crate::eval::{decode_ground_truth, discover_pairs, error_map, Accumulator};

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
        let prediction = engine.predict(pair).await.map_err(|e| format!("{}: {e}", files.name))?;
        let map = prediction.disparity;
        let metrics = truth.as_ref().map(|truth| {
            let mut acc = Accumulator::default();
            acc.add(&map, truth, args.maxdisp);
            overall.merge(&acc);
            acc.metrics()
        });
        if let Some(out) = &args.save {
            let dir = out.join(&files.name);
            let write = |file: &str, bytes: Vec<u8>| {
                std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(dir.join(file), bytes))
                    .map_err(|e| format!("{}: {e}", dir.join(file).display()))
            };
            write("disparity.pfm", pfm::encode(&map))?;
            write("disparity_color.png", colormap::color_png(&map))?;
            if let Some(truth) = &truth {
                let errors = error_map(&map, truth);
                write(
                    "error.png",
                    crate::codec::png_bytes(errors.as_raw(), width, height, image::ExtendedColorType::Rgb8),
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
        });
    }
    let overall = (overall.metrics().valid_pixels > 0).then(|| overall.metrics());
    if args.json {
        let json = serde_json::json!({
            "model": info.name,
            "device": info.device,
            "maxdisp": args.maxdisp,
            "pairs": reports,
            "overall": overall,
        });
        return Ok(serde_json::to_string_pretty(&json).expect("report serialises"));
    }
    Ok(eval_table(&reports, overall.as_ref(), &info.device, args.maxdisp))
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
