//! Request IDs: every request gets one (the client's `x-request-id` when it
//! sends a sensible one, else a new UUID), and every answer carries it back,
//! in the `x-request-id` header and, for errors, in the JSON error object
//! (written by [`super::error::write_error_bodies`]), so a client's report and
//! the server's log line can be matched.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request's ID, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The client's ID if it is one we can log and echo safely: 1 to 128 visible
/// ASCII characters.
fn accepted(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let fine = !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_graphic());
    fine.then(|| text.to_owned())
}

/// Middleware (outermost): assigns the ID, then stamps the answer with it.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request.headers().get(&HEADER).and_then(accepted).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

/// `text` as it may stand in a log line: as it is when it holds only
/// characters that cannot imitate the text log's syntax (letters, digits and
/// `/-_.:~%+,@`), else quoted with its special characters escaped, so a client
/// cannot forge fields (`} path=/x {`) in a line about its own request.
pub fn log_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-_.:~%+,@".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("{text:?}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_fields_cannot_be_forged() {
        use super::log_safe;
        assert_eq!(log_safe("/api/v1/model"), "/api/v1/model");
        assert_eq!(log_safe("trace-me-42"), "trace-me-42");
        assert_eq!(log_safe("/x}path=/forged{"), r#""/x}path=/forged{""#);
        assert_eq!(log_safe("a\"b c"), r#""a\"b c""#);
        assert_eq!(log_safe(""), r#""""#);
    }

    use super::*;

    #[test]
    fn only_sensible_client_ids_are_kept() {
        assert_eq!(accepted(&HeaderValue::from_static("abc-123_X")), Some("abc-123_X".into()));
        assert_eq!(accepted(&HeaderValue::from_static("")), None);
        assert_eq!(accepted(&HeaderValue::from_static("has space")), None);
        assert_eq!(accepted(&HeaderValue::from_str(&"a".repeat(129)).unwrap()), None);
    }
}
