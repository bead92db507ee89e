//! What operators and client authors read: `/metrics` (parsed by the Python
//! Prometheus client's own parser after a mix of served, refused and failed
//! requests, with every count checked) and the OpenAPI document.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use stereo_recon::engine::{Engine, EngineConfig, Fault, FaultInjector};

/// `python3` of the set-up's venv (where `make test` installs the clients), else the one on PATH.
fn python() -> String {
    std::env::var("VIRTUAL_ENV").map(|venv| format!("{venv}/bin/python")).unwrap_or_else(|_| "python3".into())
}

/// One parsed sample: its labels and value.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the exposition text with `prometheus_client.parser` (the reference
/// Python implementation), which fails on anything off-format.
fn parse_with_prometheus_client(text: &str) -> Vec<Sample> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(samples))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "prometheus_client could not parse:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Sum of the samples named `name` whose labels include every pair of `labels`.
fn total(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn metrics_count_served_refused_and_failed_requests_and_parse_as_prometheus_text() {
    let faults = Arc::new(FaultInjector::default());
    let config = EngineConfig { faults: Some(faults.clone()), ..engine_config(model_path(), 2) };
    let engine = Engine::start(config).unwrap();
    engine.wait_ready().await.unwrap();
    let app = app(engine);
    let (left, right) = small_pair();
    let fields: [(&str, &[u8]); 2] = [("left", &left), ("right", &right)];

    // Served: two formats.
    for uri in ["/api/v1/disparity?format=pfm", "/api/v1/disparity"] {
        assert_eq!(send(&app, multipart_request(uri, &fields)).await.status, StatusCode::OK);
    }
    // Failed: one inference error.
    faults.arm(Fault::TorchError);
    assert_eq!(
        send(&app, multipart_request("/api/v1/disparity?format=png16", &fields)).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // Refused: a bad query, a wrong media type, an unknown route; and a format nobody asked for by name.
    assert_eq!(
        send(&app, multipart_request("/api/v1/disparity?format=nope", &fields)).await.status,
        StatusCode::BAD_REQUEST
    );
    let text_body = axum::http::Request::post("/api/v1/disparity?format=color")
        .header("content-type", "text/plain")
        .body(axum::body::Body::from("hi"))
        .unwrap();
    assert_eq!(send(&app, text_body).await.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(get(&app, "/no/such/route").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/api/v1/health").await.status, StatusCode::OK);

    let scrape = get(&app, "/metrics").await;
    assert_eq!(scrape.status, StatusCode::OK);
    assert!(scrape.header("content-type").starts_with("text/plain; version=0.0.4"), "{:?}", scrape.headers);
    let samples = parse_with_prometheus_client(std::str::from_utf8(&scrape.body).unwrap());

    let requests = "stereo_recon_requests_total";
    let disparity = ("route", "/api/v1/disparity");
    assert_eq!(total(&samples, requests, &[disparity]), 5.0);
    assert_eq!(total(&samples, requests, &[disparity, ("status", "200")]), 2.0);
    assert_eq!(total(&samples, requests, &[disparity, ("format", "pfm"), ("status", "200")]), 1.0);
    assert_eq!(total(&samples, requests, &[disparity, ("format", "json"), ("status", "200")]), 1.0);
    assert_eq!(total(&samples, requests, &[disparity, ("format", "png16"), ("status", "500")]), 1.0);
    assert_eq!(total(&samples, requests, &[disparity, ("format", "invalid"), ("status", "400")]), 1.0);
    assert_eq!(total(&samples, requests, &[disparity, ("format", "color"), ("status", "415")]), 1.0);
    assert_eq!(total(&samples, requests, &[("route", "unmatched"), ("status", "404")]), 1.0);
    assert_eq!(total(&samples, requests, &[("route", "/api/v1/health"), ("status", "200")]), 1.0);

    let rejected = "stereo_recon_rejected_total";
    for reason in ["invalid_query", "unsupported_media_type", "not_found"] {
        assert_eq!(total(&samples, rejected, &[("reason", reason)]), 1.0, "{reason}");
    }
    assert_eq!(total(&samples, rejected, &[("reason", "inference_failed")]), 0.0, "a 500 is a failure, not a refusal");
    assert_eq!(total(&samples, rejected, &[("reason", "queue_full")]), 0.0);

    // Durations: every request of the route observed once; phases only for served pairs.
    let duration = "stereo_recon_request_duration_seconds";
    assert_eq!(total(&samples, &format!("{duration}_count"), &[disparity]), 5.0);
    for phase in ["decode", "queue", "inference", "encode"] {
        let phase_count = total(&samples, "stereo_recon_phase_duration_seconds_count", &[("phase", phase)]);
        assert_eq!(phase_count, 2.0, "{phase}");
        let inf = total(&samples, "stereo_recon_phase_duration_seconds_bucket", &[("phase", phase), ("le", "+Inf")]);
        assert_eq!(inf, phase_count, "{phase}: the +Inf bucket holds every observation");
    }
    let inference_sum = total(&samples, "stereo_recon_phase_duration_seconds_sum", &[("phase", "inference")]);
    assert!(inference_sum > 0.0 && inference_sum < 120.0, "seconds, not milliseconds: {inference_sum}");

    // Read at scrape time from the engine, without asking it anything.
    assert_eq!(total(&samples, "stereo_recon_queue_capacity", &[]), 3.0);
    assert_eq!(total(&samples, "stereo_recon_queue_in_flight", &[]), 0.0);
    assert_eq!(total(&samples, "stereo_recon_inferences_total", &[("outcome", "completed")]), 2.0);
    assert_eq!(total(&samples, "stereo_recon_inferences_total", &[("outcome", "failed")]), 1.0);
    let info: Vec<_> = samples.iter().filter(|s| s.name == "stereo_recon_model_info").collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!((info[0].value, info[0].labels["device"].as_str()), (1.0, "cpu"));
    assert_eq!(info[0].labels["model"], "psmnet-kitti2015");
    assert_eq!(info[0].labels["precision"], "fp32");
    assert!(info[0].labels["libtorch"].starts_with("2.11.0"), "{:?}", info[0].labels);
    assert_eq!(total(&samples, "stereo_recon_upload_bytes_in_flight", &[]), 0.0);
    // A CPU server has no CUDA allocator series at all (not zeros that look like data).
    assert!(!samples.iter().any(|s| s.name.starts_with("stereo_recon_cuda")));
}
