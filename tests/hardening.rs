//! Smaller holes a hostile or careless client finds, and the browser security
//! policy: each answer is our JSON error with the right status, echoes stay
//! short, file routes neither redirect nor answer empty, and pages on other
//! origins cannot spend the server's GPU.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::*;
use stereo_recon::api::guard::OriginPolicy;

#[tokio::test]
async fn gt_scale_must_be_a_positive_number() {
    let app = app(failed_engine().await);
    for bad in ["0", "-2", "NaN", "inf", "-inf"] {
        let reply =
            send(&app, multipart_request(&format!("/api/v1/disparity?gt_scale={bad}"), &[("left", b"x")])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "gt_scale={bad}");
        assert_eq!(reply.error_code(), "invalid_query", "gt_scale={bad}");
    }
}

#[tokio::test]
async fn error_messages_echo_client_text_only_in_short() {
    let app = app(failed_engine().await);
    let long_name = "n".repeat(200_000);
    let reply = send(&app, multipart_request("/api/v1/disparity", &[(&long_name, b"x")])).await;
    assert_eq!(reply.error_code(), "unexpected_field");
    assert!(reply.body.len() < 1024, "a {} byte error body", reply.body.len());
    let long_type = format!("text/{}", "p".repeat(100_000));
    let request = Request::post("/api/v1/disparity").header("content-type", long_type).body(Body::empty()).unwrap();
    let reply = send(&app, request).await;
    assert_eq!(reply.error_code(), "unsupported_media_type");
    assert!(reply.body.len() < 1024, "a {} byte error body", reply.body.len());
    let reply = get(&app, &format!("/{}", "q".repeat(50_000))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.len() < 1024);
}

#[tokio::test]
async fn file_routes_answer_json_and_never_redirect() {
    let app = app(failed_engine().await);
    for uri in [
        "/data/synthetic",
        "/data/synthetic/",
        "/static/nope.js",
        "/data/nope.png",
        "http://evil.example/data/synthetic",
    ] {
        let reply = get(&app, uri).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert!(reply.headers.get("location").is_none(), "{uri} redirects");
        assert_eq!(reply.error_code(), "not_found", "{uri}");
    }
    let reply = send(&app, Request::post("/static/app.js").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");
    assert_eq!(get(&app, "/static/app.js").await.status, StatusCode::OK, "files are still served");
}

#[tokio::test]
async fn pages_on_other_origins_cannot_post_unless_allowed() {
    let engine = failed_engine().await;
    let app = app(engine.clone());
    let post = |origin: &str| {
        Request::post("/api/v1/disparity")
            .header("host", "localhost:5000")
            .header("origin", origin)
            .header("content-type", "text/plain")
            .body(Body::empty())
            .unwrap()
    };
    let reply = send(&app, post("https://evil.example")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.error_code(), "cross_origin_forbidden");
    // The page's own origin, and clients without Origin, reach the handler (415 here).
    assert_eq!(send(&app, post("http://localhost:5000")).await.error_code(), "unsupported_media_type");
    // Reading the health from another origin is harmless and not refused.
    let read = Request::get("/api/v1/health").header("origin", "https://evil.example").body(Body::empty()).unwrap();
    assert_ne!(send(&app, read).await.status, StatusCode::FORBIDDEN);

    let mut allowed = state(engine, DEFAULT_LIMITS);
    allowed.origins = OriginPolicy { allowed: vec!["https://lab.example".into()] };
    let app = stereo_recon::router(allowed);
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/v1/disparity")
        .header("origin", "https://lab.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, preflight).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("access-control-allow-origin"), "https://lab.example");
    assert!(reply.header("access-control-allow-methods").contains("POST"));
    let reply = send(&app, post("https://lab.example")).await;
    assert_eq!(reply.error_code(), "unsupported_media_type", "allowed origins reach the handler");
    assert_eq!(reply.header("access-control-allow-origin"), "https://lab.example");
    assert_eq!(send(&app, post("https://other.example")).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_errors_repeat_it() {
    let app = app(failed_engine().await);
    let given = Request::get("/nope").header("x-request-id", "client-7").body(Body::empty()).unwrap();
    let reply = send(&app, given).await;
    assert_eq!(reply.header("x-request-id"), "client-7");
    assert_eq!(reply.json()["error"]["request_id"], "client-7");
    assert_eq!(reply.error_code(), "not_found");
    // Without one (or with one we will not echo), the server makes a UUID.
    let spaced = Request::get("/api/v1/examples").header("x-request-id", "two words").body(Body::empty()).unwrap();
    let reply = send(&app, spaced).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-request-id").len(), 36, "{}", reply.header("x-request-id"));
    let reply = get(&app, "/static/nope.css").await;
    let id = reply.header("x-request-id").to_owned();
    assert_eq!(reply.json()["error"]["request_id"], id.as_str());
}

#[tokio::test]
async fn the_page_is_sent_with_security_headers() {
    let app = app(failed_engine().await);
    let reply = get(&app, "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    let csp = reply.header("content-security-policy");
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(reply.header("x-content-type-options"), "nosniff");
    assert_eq!(reply.header("referrer-policy"), "no-referrer");
    assert_eq!(reply.header("x-frame-options"), "DENY");
}

/// The Open Inference Protocol's routes answer its own error shape, whatever refused them.
#[tokio::test]
async fn every_v2_error_is_the_protocols_error_object() {
    let app = app(failed_engine().await);
    let v2_error = |reply: &Reply| {
        let json = reply.json();
        assert!(json["error"].is_string(), "{} answered {json}", reply.status);
        assert_eq!(reply.header("content-type"), "application/json");
    };
    // Invalid UTF-8 in the model name (an extractor's rejection).
    let reply = get(&app, "/v2/models/%FF%FE").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    v2_error(&reply);
    // Unmatched route, wrong method, not ready, refused transfer coding, other origin.
    let reply = get(&app, "/v2/nothing/here").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    v2_error(&reply);
    let reply = send(&app, Request::delete("/v2/models/psmnet-kitti2015").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    v2_error(&reply);
    let reply = get(&app, "/v2/health/ready").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    v2_error(&reply);
    let gzip = Request::post("/v2/models/psmnet-kitti2015/infer")
        .header("transfer-encoding", "gzip, chunked")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, gzip).await;
    assert_eq!(reply.status, StatusCode::NOT_IMPLEMENTED);
    v2_error(&reply);
    let foreign = Request::post("/v2/models/psmnet-kitti2015/infer")
        .header("origin", "https://evil.example")
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, foreign).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    v2_error(&reply);
    // Our API keeps its own shape beside it.
    assert_eq!(get(&app, "/api/v1/nothing").await.error_code(), "not_found");
}

/// A shape whose H * W * 3 wraps around in u64 is refused (not a panic), whichever input has it.
#[tokio::test]
async fn v2_shapes_that_overflow_are_refused() {
    let app = app(ready_engine(2).await);
    let input = |name: &str, shape: serde_json::Value, data: serde_json::Value| serde_json::json!({ "name": name, "datatype": "UINT8", "shape": shape, "data": data });
    let small = serde_json::json!([1, 2, 3, 4, 5, 6]);
    let wrapping = serde_json::json!([2_900_561_549u64, 4_239_809_835u64, 3]);
    for (left_shape, right_shape) in
        [(serde_json::json!([1, 2, 3]), wrapping.clone()), (wrapping, serde_json::json!([1, 2, 3]))]
    {
        let body = serde_json::json!({ "inputs": [
            input("left", left_shape, small.clone()),
            input("right", right_shape, small.clone()),
        ]});
        let reply = send(&app, json_request("/v2/models/psmnet-kitti2015/infer", &body)).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&reply.body));
        assert!(reply.json()["error"].is_string());
    }
    // Two valid inputs of different sizes: the pair's mismatch, not a crash.
    let body = serde_json::json!({ "inputs": [
        input("left", serde_json::json!([1, 2, 3]), small.clone()),
        input("right", serde_json::json!([2, 1, 3]), small),
    ]});
    let reply = send(&app, json_request("/v2/models/psmnet-kitti2015/infer", &body)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

/// A Range past a file's end answers JSON 416 (not an empty body with the file's type).
#[tokio::test]
async fn a_range_past_the_end_of_a_file_answers_json() {
    let app = app(failed_engine().await);
    let request = Request::get("/static/style.css").header("range", "bytes=99999999-").body(Body::empty()).unwrap();
    let reply = send(&app, request).await;
    assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.error_code(), "range_not_satisfiable");
}

/// With `--api-key`, every API route needs `Authorization: Bearer KEY` (401 in
/// each protocol's error shape otherwise, counted like every refusal); probes,
/// metrics and the page stay open; any of several keys works.
#[tokio::test]
async fn api_keys_guard_every_api_route_but_probes_metrics_and_the_page() {
    use stereo_recon::api::auth::ApiKeys;
    let mut state = state(failed_engine().await, DEFAULT_LIMITS);
    state.api_keys = ApiKeys::load(&["first-key-0123456789".into(), "second-key-0123456789".into()], None).unwrap();
    let app = stereo_recon::router(state);
    let with = |uri: &str, authorization: Option<&str>| {
        let mut request = Request::get(uri);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.body(Body::empty()).unwrap()
    };

    let reply = send(&app, with("/api/v1/model", None)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_code(), "unauthorized");
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("Authorization: Bearer"));
    assert!(reply.json()["error"]["request_id"].is_string());
    assert_eq!(reply.header("www-authenticate"), "Bearer realm=\"stereo-recon\"");
    let reply = send(&app, with("/api/v1/model", Some("Bearer first-key-012345678"))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("not valid"));
    assert!(!String::from_utf8_lossy(&reply.body).contains("first-key"), "a key is never echoed");
    for key in ["Bearer first-key-0123456789", "bearer second-key-0123456789"] {
        assert_ne!(send(&app, with("/api/v1/model", Some(key))).await.status, StatusCode::UNAUTHORIZED, "{key}");
    }
    // The Open Inference Protocol answers in its own shape.
    let reply = send(&app, with("/v2/models/psmnet-kitti2015", Some("Basic Zm9vOmJhcg=="))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["error"].is_string(), "{}", reply.json());
    // An upload is refused before its body matters.
    let reply = send(&app, multipart_request("/api/v1/disparity", &[("left", b"x"), ("right", b"y")])).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // A browser's WebSocket cannot set headers: the stream takes the key as a subprotocol.
    let handshake = |protocols: &str| {
        Request::get("/api/v1/stream")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", protocols)
            .body(Body::empty())
            .unwrap()
    };
    let reply = send(&app, handshake("stereo-recon")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(&app, handshake("stereo-recon, bearer.first-key-012345678x")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "a wrong key");
    let reply = send(&app, handshake("stereo-recon, bearer.second-key-0123456789")).await;
    // Past the key: this server's model failed to load, so the stream is refused for that.
    assert_eq!(reply.error_code(), "engine_unavailable");

    for open in ["/api/v1/health", "/v2/health/live", "/v2/health/ready", "/metrics", "/", "/static/app.js"] {
        assert_ne!(send(&app, with(open, None)).await.status, StatusCode::UNAUTHORIZED, "{open}");
    }
    let metrics = String::from_utf8(send(&app, with("/metrics", None)).await.body.to_vec()).unwrap();
    assert!(metrics.contains("stereo_recon_rejected_total{reason=\"unauthorized\"} 6"), "{metrics}");

    // Without keys (the default) nothing asks for one.
    let open = app_without_keys().await;
    assert_ne!(send(&open, with("/api/v1/model", None)).await.status, StatusCode::UNAUTHORIZED);
}

async fn app_without_keys() -> axum::Router {
    app(failed_engine().await)
}
