//! What each subcommand does: `serve`, `predict`, `render-synthetic`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

use tokio::net::TcpListener;
use tracing::{error, info};

use crate::api::{AppState, Limits};
use crate::codec::{colormap, kitti, pfm};
use crate::config::{Config, PredictArgs, RenderArgs};
use crate::decode::decode_rgb;
use crate::engine::{Engine, EngineError, StereoPair};

/// Runs the server until SIGTERM or Ctrl-C; exits non-zero if the model cannot load.
pub async fn serve(config: Config) -> ExitCode {
    let engine = match Engine::start(config.model.engine_config(config.queue_depth)) {
        Ok(engine) => engine,
        Err(e) => {
            error!("cannot start the engine thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = AppState {
        engine: engine.clone(),
        limits: Limits { max_upload_bytes: config.max_upload_bytes, max_pixels: config.max_pixels },
        static_dir: config.static_dir.clone(),
        data_dir: config.data_dir.clone(),
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
    let read = |path: &std::path::Path| {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        decode_rgb(&bytes, u64::MAX).map_err(|e| format!("{}: {e}", path.display()))
    };
    let pair = StereoPair::new(read(&args.left)?, read(&args.right)?).map_err(|e| e.to_string())?;

    let engine = Engine::start(args.model.engine_config(1)).map_err(|e| e.to_string())?;
    let info = engine.wait_ready().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let prediction = engine.predict(pair).await.map_err(|e: EngineError| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let map = prediction.disparity;

    let bytes = if kind.as_deref() == Some("pfm") { pfm::encode(&map) } else { kitti::encode_png16(&map) };
    std::fs::write(&args.output, bytes).map_err(|e| format!("{}: {e}", args.output.display()))?;
    if let Some(path) = &args.color {
        std::fs::write(path, colormap::color_png(&map)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let stats = map.stats();
    Ok(format!(
        "{}: {}x{} disparity, min {:.2} max {:.2} mean {:.2} px, {:.2} s on {}",
        args.output.display(),
        map.width(),
        map.height(),
        stats.min,
        stats.max,
        stats.mean,
        seconds,
        info.device
    ))
}

/// `render-synthetic`: writes the sample scene.
pub fn render_synthetic(args: RenderArgs) -> Result<String, String> {
    crate::synthetic::write_scene(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    Ok(format!("wrote the synthetic scene to {}", args.output.display()))
}
