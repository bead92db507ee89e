//! What operators and client authors read: `/metrics` (parsed by the Python
//! Prometheus client's own parser after a mix of served, refused and failed
//! requests, with every count checked) and the OpenAPI document.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use stereo_recon::engine::{Engine, EngineConfig, Fault, FaultInjector};

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
    let mut child = std::process::Command::new(venv_python())
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
    // It has the CPU buffer pool's: grown by the passes' activations, mostly free between requests.
    let pool_held = total(&samples, "stereo_recon_buffer_pool_bytes", &[]);
    let pool_in_use = total(&samples, "stereo_recon_buffer_pool_in_use_bytes", &[]);
    assert!(pool_held >= 16.0 * 1_048_576.0, "the passes' large tensors came from the pool: {pool_held}");
    assert!(pool_in_use < pool_held / 4.0, "activations go back after a pass: {pool_in_use} of {pool_held}");
}

/// Runs a venv tool (installed by `make test`'s set-up) and returns its status and output.
async fn run_venv_tool(tool: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(venv_tool(tool))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The real server on 127.0.0.1:0 with the model; its address and a stop switch.
async fn serve_for_clients() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = state(ready_engine(4).await, DEFAULT_LIMITS);
    tokio::spawn(stereo_recon::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (address, stop)
}

/// The OpenAPI document is valid OpenAPI 3.1 (openapi-spec-validator), and
/// schemathesis, driving every operation of the live server with generated
/// and example requests, finds no 5xx and no answer that departs from it.
#[tokio::test]
async fn the_openapi_document_is_valid_and_the_live_server_keeps_to_it() {
    let (address, stop) = serve_for_clients().await;
    let url = format!("http://{address}/api/v1/openapi.json");
    let document = reqwest_get(&url).await;
    let doc: serde_json::Value = serde_json::from_str(&document).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = [
        "/api/v1/disparity",
        "/api/v1/health",
        "/api/v1/model",
        "/api/v1/examples",
        "/metrics",
        "/api/v1/openapi.json",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/config",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ];
    for path in paths {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    let file = std::env::temp_dir().join(format!("stereo-recon-openapi-{}.json", std::process::id()));
    std::fs::write(&file, &document).unwrap();
    let (valid, said) = run_venv_tool("openapi-spec-validator", &[file.to_str().unwrap()]).await;
    assert!(valid, "openapi-spec-validator: {said}");
    let _ = std::fs::remove_file(&file);

    let config = repo().join("tests/schemathesis/schemathesis.toml");
    let (passed, report) = run_venv_tool(
        "st",
        &[
            "--config-file",
            config.to_str().unwrap(),
            "run",
            &url,
            "--max-examples",
            "25",
            "--seed",
            "1",
            // One worker: with two, hypothesis describes lambdas with `ast.parse` from two
            // threads at once, which CPython 3.11 can fail ("AST constructor recursion depth
            // mismatch"): a crash inside schemathesis, not a finding about the server.
            "--workers",
            "1",
            "--request-timeout",
            "60",
        ],
    )
    .await;
    assert!(passed, "schemathesis found problems:\n{report}");
    assert!(report.contains("20 selected / 20 total"), "every operation tested:\n{report}");
    let _ = stop.send(());
}

/// A plain GET over TCP (the test crate has no HTTP client; this is all it needs).
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// A real JSON answer carrying every kind of image and block (PFMs, error map,
/// depth, evaluation, reconstruction) validates against the document's
/// `DisparityAnswer` schema, checked by the `jsonschema` package (draft 2020-12,
/// the dialect of OpenAPI 3.1), so the hand-written JSON stays what the
/// document says.
#[tokio::test]
async fn a_full_json_answer_matches_its_schema() {
    let app = app(ready_engine(1).await);
    let dir = repo().join("data/synthetic");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let (left, right, truth, calibration) =
        (read("left.png"), read("right.png"), read("disp_gt.pfm"), read("calib.json"));
    let fields: [(&str, &[u8]); 4] =
        [("left", &left), ("right", &right), ("ground_truth", &truth), ("calibration", &calibration)];
    let uri = "/api/v1/disparity?format=json&include_pfm=true&max_uncertainty=1.5";
    let reply = send(&app, multipart_request(uri, &fields)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    let answer = reply.json();
    for key in [
        "pfm",
        "error_png",
        "depth_color_png",
        "depth_pfm",
        "uncertainty_png",
        "uncertainty_pfm",
        "depth_uncertainty_pfm",
    ] {
        assert!(answer["images"][key].is_string(), "{key} missing: the check would not cover it");
    }
    for block in ["evaluation", "reconstruction", "uncertainty", "sparsification", "evaluation_kept"] {
        assert!(answer[block].is_object(), "{block} missing: the check would not cover it");
    }
    assert!(answer["reconstruction"]["depth_uncertainty"].is_object());

    let document = get(&app, "/api/v1/openapi.json").await;
    let script = r#"
import json, sys
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
document, answer = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
registry = Registry().with_resource("urn:doc", Resource.from_contents(document, default_specification=DRAFT202012))
validator = Draft202012Validator({"$ref": "urn:doc#/components/schemas/DisparityAnswer"}, registry=registry)
errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(answer)]
print("\n".join(errors[:20]) or "valid")
# The schema is closed: an image key it does not list is an error.
answer["images"]["surprise_png"] = "AAAA"
print("closed" if not validator.is_valid(answer) else "open")
"#;
    let temp = std::env::temp_dir();
    let doc_file = temp.join(format!("stereo-recon-doc-{}.json", std::process::id()));
    let answer_file = temp.join(format!("stereo-recon-answer-{}.json", std::process::id()));
    std::fs::write(&doc_file, &document.body).unwrap();
    std::fs::write(&answer_file, &reply.body).unwrap();
    let output = std::process::Command::new(venv_python())
        .args(["-c", script, doc_file.to_str().unwrap(), answer_file.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = (std::fs::remove_file(&doc_file), std::fs::remove_file(&answer_file));
    let said = String::from_utf8_lossy(&output.stdout);
    assert_eq!(said.trim(), "valid\nclosed", "stderr: {}", String::from_utf8_lossy(&output.stderr));
}

/// `/docs` is Swagger UI served by us, pointed at our document, with nothing
/// fetched from elsewhere (the browser test renders it).
#[tokio::test]
async fn the_docs_page_is_served_from_here() {
    let app = app(failed_engine().await);
    let redirect = get(&app, "/docs").await;
    assert!(redirect.status.is_redirection(), "{:?}", redirect.status);
    let page = get(&app, "/docs/").await;
    assert_eq!(page.status, StatusCode::OK);
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(html.contains("swagger-ui-bundle.js"), "{html}");
    let initializer = get(&app, "/docs/swagger-initializer.js").await;
    let script = String::from_utf8_lossy(&initializer.body).into_owned();
    assert!(script.contains("/api/v1/openapi.json"), "{script}");
    for asset in ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"] {
        let reply = get(&app, asset).await;
        assert_eq!(reply.status, StatusCode::OK, "{asset}");
        assert!(reply.body.len() > 10_000, "{asset} is the real asset");
    }
    for text in [&html, &script] {
        assert!(!text.contains("https://") && !text.contains("//cdn"), "an external URL: {text}");
    }
}

/// Every answer format, asked once, is counted under its own `format` label
/// (the label list is the format list, so a new format cannot be counted as `invalid`).
#[tokio::test]
async fn every_format_is_counted_under_its_own_label() {
    let engine = ready_engine(2).await;
    let state = state(engine, DEFAULT_LIMITS);
    let metrics = state.metrics.clone();
    let app = stereo_recon::router(state.clone());
    let scene = small_scene();
    let calibration = stereo_recon::calibration::formats::write_json(&scene.calibration);
    let fields: [(&str, &[u8]); 3] =
        [("left", &scene.left), ("right", &scene.right), ("calibration", calibration.as_bytes())];
    for format in stereo_recon::pipeline::OutputFormat::ALL {
        let uri = format!("/api/v1/disparity?format={}", format.label());
        let reply = send(&app, multipart_request(&uri, &fields)).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&reply.body));
        assert!(reply.header("server-timing").contains("inference;dur="), "{uri}");
    }
    let samples = parse_with_prometheus_client(&metrics.render(&state));
    for format in stereo_recon::pipeline::OutputFormat::ALL {
        let labels = [("route", "/api/v1/disparity"), ("format", format.label()), ("status", "200")];
        assert_eq!(total(&samples, "stereo_recon_requests_total", &labels), 1.0, "{}", format.label());
    }
    let invalid = [("route", "/api/v1/disparity"), ("format", "invalid"), ("status", "200")];
    assert_eq!(total(&samples, "stereo_recon_requests_total", &invalid), 0.0);
    // Files under /static and /data are their routes, not unmatched.
    for path in ["/static/style.css", "/data/synthetic/left.png"] {
        assert_eq!(
            send(&app, axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap()).await.status,
            StatusCode::OK
        );
    }
    let samples = parse_with_prometheus_client(&metrics.render(&state));
    for route in ["/static", "/data"] {
        let labels = [("route", route), ("format", "none"), ("status", "200")];
        assert_eq!(total(&samples, "stereo_recon_requests_total", &labels), 1.0, "{route}");
    }
}

/// The Open Inference Protocol's answers report the same phases as our API's
/// (`Server-Timing`, the phase histograms).
#[tokio::test]
async fn v2_answers_report_their_phases() {
    let engine = ready_engine(2).await;
    let state = state(engine, DEFAULT_LIMITS);
    let app = stereo_recon::router(state.clone());
    let (width, height) = (40u32, 30u32);
    let pixels: Vec<u8> = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
    let input = |name: &str| serde_json::json!({ "name": name, "datatype": "UINT8", "shape": [height, width, 3], "data": pixels });
    let body = serde_json::json!({ "inputs": [input("left"), input("right")], "outputs": [{ "name": "disparity" }] });
    let reply = send(&app, json_request("/v2/models/psmnet-kitti2015/infer", &body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    let timing = reply.header("server-timing");
    for phase in ["decode", "queue", "inference", "encode", "total"] {
        assert!(timing.contains(&format!("{phase};dur=")), "{timing}");
    }
    let samples = parse_with_prometheus_client(&state.metrics.render(&state));
    let inference = [("phase", "inference")];
    assert_eq!(total(&samples, "stereo_recon_phase_duration_seconds_count", &inference), 1.0);
}
