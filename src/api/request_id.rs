//! Request IDs: every request gets one (the client's `x-request-id` when it
//! sends a sensible one, else a new UUID), and every answer carries it back,
//! in the `x-request-id` header and, for errors, in the JSON error object, so
//! a client's report and the server's log line can be matched.

use super::error::{ErrorAnswer, ErrorObject};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request's ID, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// An error answer's code and message, kept beside its body so the request ID
/// can be added to the JSON error object without parsing the body.
#[derive(Debug, Clone)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    fn json(&self, request_id: &str) -> String {
        let error =
            ErrorObject { code: self.code.clone(), message: self.message.clone(), request_id: Some(request_id.into()) };
        serde_json::to_string(&ErrorAnswer { error }).expect("an error object serialises")
    }
}

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
    if let Some(error) = response.extensions().get::<ErrorBody>().cloned() {
        let body = error.json(&id);
        response.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
        *response.body_mut() = Body::from(body);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sensible_client_ids_are_kept() {
        assert_eq!(accepted(&HeaderValue::from_static("abc-123_X")), Some("abc-123_X".into()));
        assert_eq!(accepted(&HeaderValue::from_static("")), None);
        assert_eq!(accepted(&HeaderValue::from_static("has space")), None);
        assert_eq!(accepted(&HeaderValue::from_str(&"a".repeat(129)).unwrap()), None);
    }
}
