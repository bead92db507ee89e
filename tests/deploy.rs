//! The deployment manifests (`deploy/kubernetes/`) and the image definition,
//! checked offline: the Kubernetes resources against the schemas of a pinned
//! Kubernetes version (`kubernetes-validate --strict`), and what they say
//! against what the server and the Dockerfile really do (ports, probe routes,
//! the user, the drain time, the autoscaler's metric).

mod common;

use axum::http::StatusCode;
use clap::Parser;
use common::*;
use stereo_recon::config::{Cli, Command};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";

#[test]
fn manifests_validate_against_the_pinned_kubernetes_schemas() {
    let dir = repo().join("deploy/kubernetes");
    let files =
        ["deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml", "batch-job.yaml"];
    let output = std::process::Command::new(venv_tool("kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(files.iter().map(|f| dir.join(f)))
        .output()
        .expect("kubernetes-validate runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{report}");
    for file in files {
        assert!(report.contains(&format!("{file} passed")), "{file} not validated:\n{report}");
    }
    // KServe's CRD is not in Kubernetes' schemas (and no registry package ships
    // it): the tool says it cannot check the InferenceService, and we say so too.
    let kserve = std::process::Command::new(venv_tool("kubernetes-validate"))
        .args(["-k", KUBERNETES_VERSION])
        .arg(dir.join("inferenceservice.yaml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&kserve.stdout).into_owned() + &String::from_utf8_lossy(&kserve.stderr);
    assert!(said.contains("Couldn't find schema for kind InferenceService"), "{said}");
}

#[tokio::test]
async fn manifests_agree_with_the_server_and_the_image() {
    let facts = manifest_facts();

    // The container's arguments parse as our `serve` and listen where the probes look.
    let args: Vec<String> = serde_json::from_value(facts["args"].clone()).unwrap();
    let cli = Cli::try_parse_from(std::iter::once("stereo-recon".to_owned()).chain(args)).expect("the args parse");
    let Command::Serve(config) = cli.command else { panic!("not serve") };
    assert_eq!(u64::from(config.port), facts["container_port"].as_u64().unwrap());
    let isvc: Vec<String> = serde_json::from_value(facts["isvc_args"].clone()).unwrap();
    let Command::Serve(isvc) =
        Cli::try_parse_from(std::iter::once("stereo-recon".to_owned()).chain(isvc)).unwrap().command
    else {
        panic!("not serve")
    };
    assert_eq!(u64::from(isvc.port), facts["isvc_port"].as_u64().unwrap());

    // Probe routes exist: liveness answers even without a model, readiness only with one.
    let failed = app(failed_engine().await);
    let ready = app(ready_engine(1).await);
    let probes = &facts["probes"];
    assert_eq!(get(&failed, probes["livenessProbe"].as_str().unwrap()).await.status, StatusCode::OK);
    for probe in [&probes["readinessProbe"], &probes["startupProbe"], &facts["isvc_probe"]] {
        let path = probe.as_str().unwrap();
        assert_eq!(get(&ready, path).await.status, StatusCode::OK, "{path}");
        assert!(get(&failed, path).await.status.is_client_error(), "{path} must fail without a model");
    }

    // The drain fits in the grace period, after the preStop pause.
    let drain: u64 = facts["env"]["STEREO_RECON_SHUTDOWN_TIMEOUT_SECS"].as_str().unwrap().parse().unwrap();
    let grace = facts["grace_seconds"].as_u64().unwrap();
    assert!(facts["pre_stop_seconds"].as_u64().unwrap() + drain < grace, "{facts}");
    assert!(grace <= 60, "keep node drains quick: {grace}");

    // The user is the image's numeric user, and the locked-down context is complete.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.lines().any(|l| l.trim() == "USER 10001:10001"), "the image runs as 10001:10001");
    let pod = &facts["pod_security"];
    assert_eq!((pod["runAsNonRoot"].as_bool(), pod["runAsUser"].as_u64()), (Some(true), Some(10001)));
    let container = &facts["container_security"];
    assert_eq!(container["readOnlyRootFilesystem"], true);
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(facts["tmp_mount"], serde_json::json!(["/tmp"]), "the caches' only writable place");
    assert_eq!(facts["gpu_limit"], 1);

    // The autoscaler's metric is one /metrics really exports, through the adapter rule.
    let metric = facts["hpa_metric"].as_str().unwrap();
    assert_eq!(facts["rule_name"], metric);
    assert!(facts["rule_series"].as_str().unwrap().starts_with(metric));
    let exposition = String::from_utf8(get(&ready, "/metrics").await.body.to_vec()).unwrap();
    assert!(exposition.lines().any(|l| l.starts_with(&format!("{metric} "))), "{metric} not exported");

    // Selectors pick the pods.
    assert_eq!(facts["service_selector"], facts["pod_labels"]);
    assert_eq!(facts["pdb_selector"], facts["pod_labels"]);
}

/// The batch Job: pod k's arguments parse as `batch --shard k/N` with N the
/// number of completions, over the mounted volume, and its pods are nobody's
/// serving endpoints.
#[test]
fn the_indexed_job_runs_one_shard_per_pod() {
    use stereo_recon::config::Shard;
    let facts = manifest_facts();
    let job = &facts["job"];
    assert_eq!(job["mode"], "Indexed");
    let completions = job["completions"].as_u64().unwrap();
    assert_eq!(job["parallelism"].as_u64(), Some(completions));
    assert_eq!(job["index_env"], serde_json::json!(["JOB_COMPLETION_INDEX"]));
    let args: Vec<String> = serde_json::from_value(job["args"].clone()).unwrap();
    let mut shards = Vec::new();
    for index in 0..completions {
        // What Kubernetes does with $(VAR) in args, from the pod's environment.
        let expanded = args.iter().map(|a| a.replace("$(JOB_COMPLETION_INDEX)", &index.to_string()));
        let cli =
            Cli::try_parse_from(std::iter::once("stereo-recon".to_owned()).chain(expanded)).expect("the args parse");
        let Command::Batch(batch) = cli.command else { panic!("not batch") };
        assert_eq!(batch.shard, Shard { index, count: completions }, "pod {index}");
        let mounts: Vec<&str> = job["mounts"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        for path in batch.inputs.iter().chain([&batch.out]) {
            assert!(mounts.iter().any(|m| path.starts_with(m)), "{} is on no volume", path.display());
        }
        shards.push(batch.shard);
    }
    // Every pair k lands in exactly one pod's slice.
    for k in 0..1000 {
        assert_eq!(shards.iter().filter(|s| s.takes(k)).count(), 1, "pair {k}");
    }
    assert_ne!(job["pod_labels"], facts["service_selector"], "the Service must not route to batch pods");
    assert_eq!(job["pod_security"]["runAsUser"], 10001);
    assert_eq!(job["container_security"]["readOnlyRootFilesystem"], true);
}

/// The Dockerfile builds with Docker BuildKit and with Debian 12's buildah
/// 1.28 (podman 4.3), whose COPY takes only --chmod, --chown and --from.
#[test]
fn the_dockerfile_uses_only_flags_old_buildah_knows() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") || l.starts_with("ADD ")) {
        for flag in line.split_whitespace().skip(1).take_while(|w| w.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(["--chmod", "--chown", "--from"].contains(&name), "{line}: buildah 1.28 rejects {name}");
        }
    }
    // The runtime stage carries the ffmpeg program that `batch` reads videos with.
    let runtime = dockerfile.split("AS runtime").nth(1).expect("a runtime stage");
    assert!(runtime.contains("apt-get install -y --no-install-recommends ffmpeg"), "ffmpeg in the image");
}

/// What the manifests say, read by a YAML parser (tests/clients/manifest_facts.py).
fn manifest_facts() -> serde_json::Value {
    let output = std::process::Command::new(venv_tool("python"))
        .arg(repo().join("tests/clients/manifest_facts.py"))
        .arg(repo().join("deploy/kubernetes"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}
