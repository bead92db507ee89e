//! The built binary itself: how it links, the `predict` command, and `serve`
//! on a real socket with a graceful SIGTERM.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::loadgen::{http, ServerProcess};
use common::*;
use stereo_recon::codec::{kitti, pfm};

const BIN: &str = env!("CARGO_BIN_EXE_stereo-recon");

#[test]
fn binary_keeps_libtorch_cuda_linked() {
    // With --as-needed the linker would drop libtorch_cuda.so (nothing calls into it
    // directly) and CUDA would never register on a GPU machine. CI has no GPU to notice.
    let output = Command::new("readelf").args(["-d", BIN]).output().expect("readelf (binutils) runs");
    let dynamic = String::from_utf8_lossy(&output.stdout);
    assert!(dynamic.contains("[libtorch_cuda.so]"), "libtorch_cuda.so not in NEEDED:\n{dynamic}");
    assert!(dynamic.contains("[libtorch_cpu.so]"));
}

#[test]
fn predict_writes_pfm_png16_and_colour() {
    let dir = std::env::temp_dir().join(format!("stereo-recon-predict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (left, right) = small_pair();
    std::fs::write(dir.join("l.png"), left).unwrap();
    std::fs::write(dir.join("r.png"), right).unwrap();
    let model = model_path();
    let run = |out: &str, extra: &[&str]| {
        Command::new(BIN)
            .args(["predict", "l.png", "r.png", "-o", out, "--device", "cpu", "--model"])
            .arg(&model)
            .args(extra)
            .current_dir(&dir)
            .output()
            .unwrap()
    };
    let out = run("d.pfm", &["--color", "c.png"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("64x48 disparity") && summary.contains("on cpu"), "{summary}");
    let map = pfm::decode(&std::fs::read(dir.join("d.pfm")).unwrap()).unwrap();
    assert_eq!((map.width(), map.height()), (64, 48));
    let color = image::open(dir.join("c.png")).unwrap();
    assert_eq!((color.width(), color.height()), (64, 48));

    let out = run("d.png", &[]);
    assert!(out.status.success());
    let png16 = kitti::decode_png16(&std::fs::read(dir.join("d.png")).unwrap()).unwrap();
    for (d, q) in map.values().iter().zip(png16.values()) {
        assert!((d - q).abs() <= 0.5 / 256.0 + 1e-6);
    }

    let out = run("d.jpg", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".pfm or .png"));

    // The deviation beside the disparity, and masking by it.
    let out = run("m.pfm", &["--uncertainty", "u.pfm", "--max-uncertainty", "0.8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("uncertainty (standard deviation)") && summary.contains("marked as without value"));
    let sigma = pfm::decode(&std::fs::read(dir.join("u.pfm")).unwrap()).unwrap();
    let masked = pfm::decode(&std::fs::read(dir.join("m.pfm")).unwrap()).unwrap();
    assert_eq!((sigma.width(), sigma.height()), (64, 48));
    for ((&s, &m), &d) in sigma.values().iter().zip(masked.values()).zip(map.values()) {
        assert!(s.is_finite() && s >= 0.0);
        if s > 0.8 {
            assert_eq!(m, f32::INFINITY, "a pixel above the limit keeps a value");
        } else {
            assert!((m - d).abs() < 1e-3, "an unmasked pixel changed: {m} vs {d}");
        }
    }
    for bad in ["--max-uncertainty=-1", "--max-uncertainty=nan", "--max-uncertainty=0", "--uncertainty=u.png"] {
        let out = run("x.pfm", &[bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("uncertainty"), "{bad:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn predict_refuses_a_mismatched_pair() {
    let dir = std::env::temp_dir().join(format!("stereo-recon-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (left, _) = small_pair();
    std::fs::write(dir.join("l.png"), &left).unwrap();
    std::fs::write(dir.join("r.png"), png(&image::RgbImage::new(10, 10))).unwrap();
    let out = Command::new(BIN)
        .args(["predict", "l.png", "r.png", "-o", "x.pfm", "--model"])
        .arg(model_path())
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64x48 but right image is 10x10"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_scores_pairs_and_saves_predictions_and_error_maps() {
    let out = std::env::temp_dir().join(format!("stereo-recon-eval-{}", std::process::id()));
    let output = Command::new(BIN)
        .args(["eval", "tests/fixtures", "--json", "--device", "cpu", "--save"])
        .arg(&out)
        .arg("--model")
        .arg(model_path())
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("--json prints JSON");
    let pair = &report["pairs"][0];
    assert_eq!(pair["name"], "synthetic_crop");
    assert_eq!((pair["width"].as_u64(), pair["height"].as_u64()), (Some(300), Some(250)));
    let m = &pair["metrics"];
    assert_eq!(m["valid_pixels"], 75_000);
    assert!(m["epe"].as_f64().unwrap() < 1.0, "{m}");
    for key in ["d1", "bad1", "bad2", "bad3"] {
        assert!((0.0..=100.0).contains(&m[key].as_f64().unwrap()), "{key}");
    }
    assert_eq!(report["overall"]["valid_pixels"], 75_000);
    assert!(pair["inference_ms"].as_f64().unwrap() > 0.0);
    for file in ["disparity.pfm", "uncertainty.pfm", "disparity_color.png", "error.png"] {
        assert!(out.join("synthetic_crop").join(file).is_file(), "{file} not saved");
    }
    // How well the deviation ranks the errors: the most certain pixels are the better ones.
    let s = &pair["sparsification"];
    let kept: Vec<(f64, f64)> = s["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["fraction"].as_f64().unwrap(), k["epe"].as_f64().unwrap()))
        .collect();
    assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), [1.0, 0.9, 0.8, 0.5]);
    assert!((kept[0].1 - m["epe"].as_f64().unwrap()).abs() < 1e-9, "all pixels' EPE is the EPE");
    assert!(kept[3].1 < kept[0].1, "{s}");
    assert!(s["oracle_auc_epe"].as_f64().unwrap() <= s["auc_epe"].as_f64().unwrap());
    assert!(report["overall_sparsification"]["kept"].is_array());

    // The table form names every column the benchmarks use.
    let table = Command::new(BIN)
        .args(["eval", "tests/fixtures/synthetic_crop", "--device", "cpu", "--model"])
        .arg(model_path())
        .current_dir(repo())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    for column in
        ["EPE px", "D1 %", "bad-1 %", "bad-2 %", "bad-3 %", "valid px", "excluded", "D1 80 % / all", "AUC EPE"]
    {
        assert!(text.contains(column), "{column} missing from:\n{text}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn serve_answers_on_a_socket_and_drains_on_sigterm() {
    let args = [
        "--device".into(),
        "cpu".into(),
        "--warm-sizes".into(),
        "300x250".into(),
        "--model".into(),
        model_path().display().to_string(),
    ];
    let mut server = ServerProcess::start(Path::new(BIN), &args, &repo());
    let address = server.address;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Health turns 200 once the model is warm.
    loop {
        let (status, _) = http(address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "model did not become ready in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The listed warm-up size ran, with its time, before health turned 200.
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("warm-up pass done") && l.contains("size=300x250") && l.contains("elapsed_ms")),
        "{log:#?}"
    );
    let pfm_request = |left: &[u8], right: &[u8]| {
        let (content_type, body) = multipart(&[("left", left), ("right", right)]);
        let mut request = format!(
            "POST /api/v1/disparity?format=pfm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        request
    };
    // `healthcheck` finds the port the server really listens on (here a random one
    // from --port 0) through /proc, not from the environment, which says otherwise.
    let healthcheck = |pid: u32| {
        Command::new(BIN)
            .args(["healthcheck", "--server-pid", &pid.to_string()])
            .env("STEREO_RECON_PORT", "1")
            .output()
            .expect("healthcheck runs")
    };
    let healthy = healthcheck(server.pid());
    assert!(healthy.status.success(), "{}", String::from_utf8_lossy(&healthy.stderr));
    assert!(String::from_utf8_lossy(&healthy.stdout).contains(&address.to_string()), "{healthy:?}");
    // A process with no listening socket: the fallback (STEREO_RECON_PORT=1) has no server either.
    let mut idle = Command::new("sleep").arg("30").spawn().unwrap();
    let unhealthy = healthcheck(idle.id());
    let _ = idle.kill();
    let _ = idle.wait();
    assert_eq!(unhealthy.status.code(), Some(1), "{unhealthy:?}");
    assert!(String::from_utf8_lossy(&unhealthy.stderr).contains("127.0.0.1:1"), "{unhealthy:?}");

    let (left, right) = small_pair();
    let (status, body) = http(address, &pfm_request(&left, &right));
    assert_eq!(status, 200);
    assert_eq!(pfm::decode(&body).unwrap().width(), 64);

    // SIGTERM while a request is being computed: it still gets its answer
    // (graceful drain), new connections are no longer accepted, and the
    // process exits 0.
    let (left, right) = fixture_pair();
    let in_flight = pfm_request(&left, &right);
    let pending = std::thread::spawn(move || http(address, &in_flight));
    loop {
        let (_, health) = http(address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
        if health["queue"]["in_flight"] == 1 {
            break;
        }
        assert!(!pending.is_finished(), "the request finished before it was seen in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = server.terminate(Duration::from_secs(20));
    let (answer, body) = pending.join().unwrap();
    assert_eq!(answer, 200, "the in-flight request was not drained");
    assert_eq!(pfm::decode(&body).unwrap().width(), 300);
    assert!(status.success(), "exit status {status:?}");
    assert!(TcpStream::connect(address).is_err(), "still accepting connections after exit");
    let logs: Vec<String> = server.log.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("request done") && l.contains("inference_ms")), "{logs:?}");
}

#[test]
fn serve_fails_fast_when_the_model_is_missing() {
    let output = Command::new(BIN)
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model", "/nonexistent/psmnet.pt"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("not found"), "{log}");
}

#[test]
fn json_logs_carry_one_line_per_request_with_its_request_id() {
    let args = [
        "--log-format".into(),
        "json".into(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model_path().display().to_string(),
    ];
    let mut server = ServerProcess::start(Path::new(BIN), &args, &repo());
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(server.address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0 != 200 {
        assert!(Instant::now() < deadline, "model did not become ready in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _) = http(
        server.address,
        b"GET /api/v1/examples HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-me-42\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(server.terminate(Duration::from_secs(30)).success());
    let lines: Vec<serde_json::Value> = server
        .log
        .try_iter()
        .map(|line| serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")))
        .collect();
    let done = lines
        .iter()
        .find(|l| l["message"] == "request done" && l["span"]["request_id"] == "trace-me-42")
        .unwrap_or_else(|| panic!("no request line with the request ID: {lines:#?}"));
    assert_eq!(done["status"], 200);
    assert_eq!(done["span"]["method"], "GET");
    assert_eq!(done["span"]["path"], "/api/v1/examples");
    assert!(done["total_ms"].as_f64().is_some(), "{done}");
    assert_eq!(done["level"], "INFO");
}
