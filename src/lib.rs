//! stereo-recon: PSMNet stereo disparity as a web service and a command-line tool.
//!
//! The crate is a library so that tests drive the real application in process:
//! [`router`] builds the whole HTTP app from an [`AppState`], and [`serve`] runs
//! it on a listener until a shutdown future resolves. `main.rs` only parses the
//! command line and calls in here.

pub mod api;
pub mod cli;
pub mod codec;
pub mod config;
pub mod decode;
pub mod disparity;
pub mod engine;
pub mod eval;
mod page;
pub mod preprocess;
pub mod synthetic;

use std::future::Future;

use tokio::net::TcpListener;

pub use api::{router, AppState, Limits};

/// libtorch version this binary was built against (from the torch wheel).
pub const LIBTORCH_VERSION: &str = env!("STEREO_RECON_LIBTORCH_VERSION");
/// Whether `libtorch_cuda.so` is linked in, i.e. whether CUDA can work at all.
pub const CUDA_LINKED: bool = matches!(env!("STEREO_RECON_LINKED_CUDA").as_bytes(), b"1");

/// Serves the app on `listener` until `shutdown` resolves, then lets requests
/// in flight finish (graceful shutdown) before returning.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
