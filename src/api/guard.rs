//! Request-level guards around every route: memory admission for uploads,
//! transfer codings we do not decode, the browser origin policy (CORS), the
//! page's security headers, and JSON bodies for the errors that come from
//! layers below our handlers (the file services).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{echo, ApiError};
use super::AppState;

/// A global budget of memory for uploads being received and decoded, so a
/// flood of large or slow uploads cannot grow the process without bound (the
/// inference queue only bounds what waits for the model). Counted in KiB.
#[derive(Clone)]
pub struct UploadBudget {
    semaphore: Arc<Semaphore>,
    total_kib: u32,
}

impl UploadBudget {
    pub fn new(bytes: u64) -> UploadBudget {
        let total_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        UploadBudget { semaphore: Arc::new(Semaphore::new(total_kib as usize)), total_kib }
    }

    /// A share of `bytes` of the budget, or `None` when it is not free now. A
    /// request larger than the whole budget takes all of it (it can then run
    /// alone rather than never).
    pub fn try_admit(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.total_kib);
        self.semaphore.clone().try_acquire_many_owned(kib).ok()
    }

    /// Bytes admitted now.
    pub fn in_use_bytes(&self) -> u64 {
        u64::from(self.total_kib - self.semaphore.available_permits() as u32) * 1024
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    pub(crate) fn full(&self) -> ApiError {
        ApiError::UploadBudgetFull { budget_bytes: self.total_bytes() }
    }
}

/// Bytes an upload is charged while it is received: its declared length, or
/// the body limit when it is sent chunked (length unknown in advance).
pub fn declared_upload_bytes(headers: &HeaderMap, limit: usize) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(limit as u64, |n| n.min(limit as u64))
}

/// Bytes charged for decoding a pair of `width x height` images: the decoder's
/// buffer (at most 16-bit RGBA, 8 bytes a pixel) and the float RGB copy (12
/// bytes a pixel), for both images.
pub fn decoded_pair_bytes(width: u32, height: u32) -> u64 {
    2 * u64::from(width) * u64::from(height) * (8 + 12)
}

/// Middleware: a body in a transfer coding other than chunked (`gzip, chunked`)
/// would be read as if it were plain; refuse it with 501 as RFC 9112 says.
pub async fn refuse_transfer_codings(request: Request, next: Next) -> Response {
    let codings: Vec<String> = request
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(',').map(|c| c.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .collect();
    if let Some(other) = codings.iter().find(|c| c.as_str() != "chunked") {
        return ApiError::UnsupportedTransferCoding(echo(other)).into_response();
    }
    next.run(request).await
}

/// Which browser origins may call the API besides the page's own.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Exact origins (`https://lab.example:8443`), or `*` for any.
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    fn allows(&self, origin: &str) -> bool {
        self.allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    !authority.is_empty() && authority.eq_ignore_ascii_case(host)
}

/// Middleware: browsers send `Origin` with cross-origin requests. A page on
/// another origin may not spend this server's GPU unless that origin is
/// allowed (`--cors-allow-origin`); allowed origins get CORS answers,
/// preflights included. Clients that are not browsers send no `Origin`.
pub async fn origin_policy(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_owned) else {
        return next.run(request).await;
    };
    if same_origin(&origin, request.headers()) {
        return next.run(request).await;
    }
    let allowed = state.origins.allows(&origin);
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let reads_only = matches!(*request.method(), Method::GET | Method::HEAD);
    if !allowed && (preflight || !reads_only) {
        return ApiError::CrossOrigin(echo(&origin)).into_response();
    }
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        let asked = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or_else(|| HeaderValue::from_static("content-type")),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        response
    } else {
        next.run(request).await
    };
    if allowed {
        let h = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "server-timing, retry-after, x-disparity-min, x-disparity-max, x-disparity-mean, x-device, \
                 x-depth-units, x-eval-epe, x-eval-d1, x-masked-pixels",
            ),
        );
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The page's content security policy: everything from this server, images
/// also from `data:` and `blob:` URLs (the results arrive as base64), no
/// framing by other sites.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; \
    script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Middleware: security headers on every answer (the page's matter; on JSON
/// and files they cost nothing and keep browsers from sniffing types).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    }
    response
}

/// Middleware: error answers made below our handlers (the file services'
/// 404, 405, 416...) come with an empty body; give them our JSON error object.
pub async fn json_error_bodies(request: Request, next: Next) -> Response {
    let path = echo(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let reason = status.canonical_reason().unwrap_or("error");
    let code = reason.to_ascii_lowercase().replace([' ', '-'], "_");
    let message = match status {
        StatusCode::NOT_FOUND => format!("no such file or endpoint: {path}"),
        _ => format!("{reason}: {path}"),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = json!({ "error": { "code": code, "message": message } }).to_string();
    parts.extensions.insert(super::request_id::ErrorBody { code, message });
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_total_and_frees_on_drop() {
        let budget = UploadBudget::new(10 * 1024);
        let a = budget.try_admit(6 * 1024).expect("fits");
        assert!(budget.try_admit(6 * 1024).is_none(), "over the budget");
        assert_eq!(budget.in_use_bytes(), 6 * 1024);
        drop(a);
        let all = budget.try_admit(100 * 1024).expect("a larger request takes the whole budget");
        assert_eq!(budget.in_use_bytes(), 10 * 1024);
        drop(all);
        assert_eq!(budget.in_use_bytes(), 0);
    }

    #[test]
    fn same_origin_compares_the_authority_with_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("localhost:5000"));
        assert!(same_origin("http://localhost:5000", &headers));
        assert!(!same_origin("http://evil.example", &headers));
        assert!(!same_origin("null", &headers));
        let policy = OriginPolicy { allowed: vec!["https://lab.example".into()] };
        assert!(policy.allows("https://LAB.example") && !policy.allows("https://other.example"));
        assert!(OriginPolicy { allowed: vec!["*".into()] }.allows("https://any.example"));
    }
}
