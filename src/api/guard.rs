//! Request-level guards around every route: the declared size of uploads,
//! transfer codings we do not decode, the browser origin policy (CORS), the
//! and the page's security headers.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{echo, ApiError};
use super::AppState;

/// Bytes an upload is charged while it is received: its declared length, or
/// the body limit when it is sent chunked (length unknown in advance).
pub fn declared_upload_bytes(headers: &HeaderMap, limit: usize) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(limit as u64, |n| n.min(limit as u64))
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

    /// Whether a request with these headers may open what spends the server's
    /// device though its method is GET (a WebSocket stream): no `Origin` (not a
    /// browser), the page's own origin, or an allowed one.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            None => true,
            Some(origin) => same_origin(origin, headers) || self.allows(origin),
        }
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
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, super::headers::expose_list());
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The page's content security policy: everything from this server, images
/// also from `data:` and `blob:` URLs (the results arrive as base64), videos
/// from `blob:` URLs (a local file played in the video mode), no framing by
/// other sites. `connect-src 'self'` covers the page's own WebSocket stream.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; \
    media-src 'self' blob:; \
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

#[cfg(test)]
mod tests {
    use super::*;

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
