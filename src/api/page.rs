//! The upload page (`GET /`), rendered from `templates/index.html`.
//!
//! The template carries only what the page needs before any script runs (the
//! limits, whether samples exist); everything live (model, device, results)
//! comes from the JSON API, which the page uses exactly as a script would.

use askama::Template;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};

use super::{ApiError, AppState};

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    version: &'static str,
    max_upload_mb: String,
    max_pixels: u64,
    max_megapixels: String,
    has_examples: bool,
}

/// The upload page.
#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    responses((status = 200, description = "The HTML page: upload a pair, see the disparity, depth and points.", content_type = "text/html; charset=utf-8", body = String))
)]
pub async fn index(State(state): State<AppState>) -> Response {
    let page = IndexPage {
        version: env!("CARGO_PKG_VERSION"),
        max_upload_mb: format!("{:.0}", state.limits.max_upload_bytes as f64 / (1024.0 * 1024.0)),
        max_pixels: state.limits.max_pixels,
        max_megapixels: format!("{:.1}", state.limits.max_pixels as f64 / 1e6),
        has_examples: !super::examples_in(&state.data_dir).is_empty(),
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::Internal(format!("page template: {e}")).into_response(),
    }
}
