//! The Open Inference Protocol (KServe v2 / Triton REST) driven by NVIDIA's
//! own Python client, `tritonclient[http]`, against the live server: health,
//! metadata, and inferences, in JSON and with the binary tensor extension,
//! whose disparity equals `/api/v1/disparity?format=pfm` for the same pair and
//! whose deviation equals `format=uncertainty`.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_reads_metadata_and_infers_the_same_disparity_as_our_api() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(stereo_recon::serve(listener, state(ready_engine(2).await, DEFAULT_LIMITS), std::future::pending()));

    let fixtures = repo().join("tests/fixtures/synthetic_crop");
    let script = repo().join("tests/clients/triton_client.py");
    let output = tokio::process::Command::new(venv_python())
        .arg(&script)
        .arg(address.to_string())
        .arg(fixtures.join("left.png"))
        .arg(fixtures.join("right.png"))
        .output()
        .await
        .expect("python runs");
    assert!(output.status.success(), "the client failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!((&seen["live"], &seen["ready"], &seen["model_ready"]), (&true.into(), &true.into(), &true.into()));
    assert_eq!(seen["server"]["name"], "stereo-recon");
    assert!(seen["server"]["extensions"].as_array().unwrap().contains(&"binary_tensor_data".into()));
    let model = &seen["model"];
    assert_eq!(model["name"], "psmnet-kitti2015");
    assert_eq!(model["inputs"][0], serde_json::json!({ "name": "left", "datatype": "UINT8", "shape": [-1, -1, 3] }));
    assert_eq!(model["outputs"][0], serde_json::json!({ "name": "disparity", "datatype": "FP32", "shape": [-1, -1] }));
    assert_eq!(
        model["outputs"][1],
        serde_json::json!({ "name": "uncertainty", "datatype": "FP32", "shape": [-1, -1] })
    );
    for kind in ["json", "binary"] {
        assert_eq!(seen[format!("{kind}_shape")], serde_json::json!([250, 300]), "{kind}");
        assert_eq!(seen[format!("{kind}_dtype")], "float32", "{kind}");
        // The same pixels through the same engine: bit for bit the same map.
        assert_eq!(seen[format!("{kind}_max_abs_diff")], 0.0, "{kind}");
    }
    // No outputs named: both, the deviation equal to our API's format=uncertainty; and
    // binary and JSON outputs mixed in one answer.
    assert_eq!(seen["default_outputs"], serde_json::json!(["disparity", "uncertainty"]));
    for key in [
        "default_disparity_max_abs_diff",
        "default_uncertainty_max_abs_diff",
        "mixed_disparity_max_abs_diff",
        "mixed_uncertainty_max_abs_diff",
    ] {
        assert_eq!(seen[key], 0.0, "{key}");
    }
    let errors = &seen["errors"];
    assert_eq!(errors["unknown_output"][0], "400", "{errors}");
    assert!(errors["unknown_output"][1].as_str().unwrap().contains("'uncertainty'"), "{errors}");
    assert_eq!(errors["wrong_datatype"][0], "400", "{errors}");
    assert!(errors["wrong_datatype"][1].as_str().unwrap().contains("must be UINT8"), "{errors}");
    assert_eq!(errors["unknown_model"][0], "404", "{errors}");
}

/// NVIDIA's `perf_analyzer` (from the tritonclient wheel) measures the server as
/// it measures Triton: it reads the model's configuration and metadata, sends
/// random UINT8 pairs over HTTP, and reports throughput and latency. A short,
/// bounded run (256x256 pairs, concurrency 1, three windows of three requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_measures_the_server_like_a_triton_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let state = state(ready_engine(2).await, DEFAULT_LIMITS);
    let metrics = state.metrics.clone();
    tokio::spawn(stereo_recon::serve(listener, state.clone(), std::future::pending()));

    let venv = std::env::var("VIRTUAL_ENV").expect("run under `make test`, which sets VIRTUAL_ENV");
    let output = tokio::process::Command::new(venv_tool("perf_analyzer"))
        .env("LD_LIBRARY_PATH", format!("{venv}/lib/python3.11/site-packages/nvidia/cuda_runtime/lib"))
        .args(["-m", "psmnet-kitti2015", "-u", &address.to_string(), "-i", "http"])
        .args(["--shape", "left:256,256,3", "--shape", "right:256,256,3", "--concurrency-range", "1:1"])
        .args(["--measurement-mode", "count_windows", "--measurement-request-count", "3"])
        .args(["--stability-percentage", "999", "--max-trials", "3"])
        .output()
        .await
        .expect("perf_analyzer runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}\n{}", String::from_utf8_lossy(&output.stderr));
    let throughput = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Throughput: ")?.strip_suffix(" infer/sec")?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no throughput in:\n{report}"));
    assert!(throughput > 0.0, "{report}");
    println!("{report}");
    // Every one of its inferences went through our queue and engine.
    let text = metrics.render(&state);
    let served = text
        .lines()
        .find(|l| {
            l.starts_with(
                "stereo_recon_requests_total{format=\"none\",route=\"/v2/models/{name}/infer\",status=\"200\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(served >= 9, "{served} inferences seen by the server:\n{text}");
}
