//! API keys for a server exposed beyond its own machine (`--api-key`,
//! `--api-key-file`; off by default, so `docker run` stays as simple).
//!
//! With keys set, every API route needs `Authorization: Bearer KEY`; what
//! stays open is what carries no data and costs nothing: health, readiness and
//! `/metrics` (for probes and scrapers), and the page with its own files (the
//! HTML, `/static`, the sample pairs in `/data`, the API's documentation), so
//! a browser can load the page, which then asks for the key. Keys are kept as
//! SHA-256 digests and compared in constant time (every key, every byte, no
//! early exit); a key is never logged.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// The accepted keys (none: no key needed).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: std::sync::Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} key(s))", self.digests.len())
    }
}

/// Shortest key accepted: a guessable key is no protection.
pub const MIN_KEY_LEN: usize = 16;

impl ApiKeys {
    /// Keys given on the command line (or the environment) and in a file of
    /// one key a line (blank lines and `#` comments skipped).
    pub fn load(given: &[String], file: Option<&std::path::Path>) -> Result<ApiKeys, String> {
        let mut keys: Vec<String> = given.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if from_file.is_empty() {
                return Err(format!("{}: no key in the file (one key a line)", path.display()));
            }
            keys.extend(from_file);
        }
        for (i, key) in keys.iter().enumerate() {
            if key.len() < MIN_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "API key {} is not usable: at least {MIN_KEY_LEN} characters, no spaces (e.g. `openssl rand -hex 24`)",
                    i + 1
                ));
            }
        }
        Ok(ApiKeys { digests: std::sync::Arc::new(keys.iter().map(|k| digest(k.as_bytes())).collect()) })
    }

    /// Whether keys are required at all.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys, in time independent of which
    /// key matches and of how much of any key does.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let mut any = 0u8;
        for key in self.digests.iter() {
            let difference = key.iter().zip(&presented).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any |= u8::from(difference == 0);
        }
        std::hint::black_box(any) == 1
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Routes open without a key: probes, scrapers, and the page's own files.
pub fn is_open(path: &str) -> bool {
    const OPEN: [&str; 5] = ["/", "/api/v1/health", "/v2/health/live", "/v2/health/ready", "/metrics"];
    const OPEN_PREFIXES: [&str; 3] = ["/static/", "/data/", "/docs"];
    OPEN.contains(&path) || OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) || path == super::openapi::DOCUMENT_PATH
}

/// The key in `Authorization: Bearer KEY`, if the header has that form.
fn bearer(request: &Request) -> Option<&[u8]> {
    let value = request.headers().get(header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| value[7..].trim_ascii())
}

/// The key a WebSocket client offered as the subprotocol `bearer.KEY`.
fn subprotocol_key(request: &Request) -> Option<&[u8]> {
    super::stream::offered_subprotocols(request.headers())
        .find_map(|p| p.strip_prefix(super::stream::KEY_SUBPROTOCOL_PREFIX))
        .map(str::as_bytes)
}

/// Refuses a request without an accepted key (401, before its body is read).
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.api_keys.enabled() || is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let refusal = match bearer(&request).or_else(|| subprotocol_key(&request)) {
        Some(key) if state.api_keys.accepts(key) => return next.run(request).await,
        Some(_) => ApiError::Unauthorized("the API key is not valid"),
        None => ApiError::Unauthorized("this server needs an API key: send 'Authorization: Bearer KEY'"),
    };
    let mut response = refusal.into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"stereo-recon\""));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_given_are_accepted() {
        let keys = ApiKeys::load(&["first-key-0123456789".into(), " second-key-0123456789 ".into()], None).unwrap();
        assert!(keys.enabled());
        assert!(keys.accepts(b"first-key-0123456789"));
        assert!(keys.accepts(b"second-key-0123456789"), "trimmed when loaded");
        assert!(!keys.accepts(b"first-key-012345678"));
        assert!(!keys.accepts(b""));
        assert!(!ApiKeys::default().enabled());
        assert!(ApiKeys::load(&["short".into()], None).unwrap_err().contains("at least 16"));
        assert!(ApiKeys::load(&["has a space in it, long".into()], None).is_err());
    }

    #[test]
    fn keys_are_read_from_a_file_of_lines() {
        let path = std::env::temp_dir().join(format!("stereo-recon-keys-{}", std::process::id()));
        std::fs::write(&path, "# team A\nkey-of-team-a-0123456789\n\n  key-of-team-b-0123456789  \n").unwrap();
        let keys = ApiKeys::load(&[], Some(&path)).unwrap();
        assert!(keys.accepts(b"key-of-team-a-0123456789") && keys.accepts(b"key-of-team-b-0123456789"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 key(s))", "a key never shows in debug output");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(ApiKeys::load(&[], Some(&path)).unwrap_err().contains("no key"));
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn probes_scrapers_and_the_page_stay_open() {
        for path in ["/", "/api/v1/health", "/v2/health/ready", "/v2/health/live", "/metrics", "/static/app.js"] {
            assert!(is_open(path), "{path}");
        }
        for path in
            ["/api/v1/disparity", "/api/v1/model", "/api/v1/examples", "/v2", "/v2/models/psmnet-kitti2015/infer"]
        {
            assert!(!is_open(path), "{path}");
        }
    }
}
