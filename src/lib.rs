//! stereo-recon: PSMNet stereo disparity as a web service and a command-line tool.
//!
//! The crate is a library so that tests drive the real application in process:
//! [`router`] builds the whole HTTP app from an [`AppState`], and [`serve`] runs
//! it on a listener until a shutdown future resolves. `main.rs` only parses the
//! command line and calls in here.
//!
//! Everything that needs libtorch (the engine, and the server and CLI built on
//! it) sits behind the default `engine` feature. Without it the crate is the
//! pure core: decoding, preprocessing, codecs, evaluation and the synthetic
//! scene, which the fuzz targets in `tests/fuzz` build in seconds.

#[cfg(feature = "engine")]
pub mod api;
pub mod calibration;
#[cfg(feature = "engine")]
pub mod cli;
pub mod codec;
#[cfg(feature = "engine")]
pub mod config;
pub mod dataset;
pub mod decode;
pub mod disparity;
#[cfg(feature = "engine")]
pub mod engine;
pub mod eval;
pub mod geometry;
pub mod healthcheck;
#[cfg(feature = "engine")]
pub mod pipeline;
pub mod preprocess;
pub mod reconstruct;
pub mod rectify;
#[cfg(feature = "engine")]
pub mod server;
pub mod synthetic;
pub mod uncertainty;

#[cfg(feature = "engine")]
pub use api::{router, AppState, Limits};

/// libtorch version this binary was built against (from the torch wheel).
#[cfg(feature = "engine")]
pub const LIBTORCH_VERSION: &str = env!("STEREO_RECON_LIBTORCH_VERSION");
/// Whether `libtorch_cuda.so` is linked in, i.e. whether CUDA can work at all.
#[cfg(feature = "engine")]
pub const CUDA_LINKED: bool = matches!(env!("STEREO_RECON_LINKED_CUDA").as_bytes(), b"1");

/// Serves the app on `listener` until `shutdown` resolves, then drains: idle
/// connections close at once, requests in flight get the drain deadline of
/// `state.connections` (see [`server`] for the connection-level limits).
#[cfg(feature = "engine")]
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The body limit the connection layer watches chunk sizes against is the upload limit.
    let limits = server::ConnectionLimits { max_body_bytes: state.limits.max_upload_bytes as u64, ..state.connections };
    let stats = state.connection_stats.clone();
    server::serve_connections(listener, router(state), limits, stats, shutdown).await
}
