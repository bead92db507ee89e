//! The Docker image's runtime layout, without Docker: `.ci/bundle.sh` assembles
//! it (the Dockerfile's builder runs the same script), then the server starts
//! from it with an empty environment (no venv, no cargo, `LD_LIBRARY_PATH` as the
//! image sets it) and answers a real request. A bundle missing a library must
//! not start: that is what proves the first test is not leaning on the venv.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::loadgen::{http, multipart, ServerProcess};
use common::*;
use stereo_recon::codec::pfm;

const BIN: &str = env!("CARGO_BIN_EXE_stereo-recon");

/// Runs `.ci/bundle.sh` on this test's binary into a fresh directory.
fn assemble(name: &str) -> PathBuf {
    let out = repo().join("target/bundle-test").join(format!("{name}-{}", std::process::id()));
    let run = Command::new("bash")
        .arg(repo().join(".ci/bundle.sh"))
        .args(["--binary", BIN, "--link", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(&out)
        .current_dir(repo())
        .output()
        .expect("bash runs");
    assert!(
        run.status.success(),
        "bundle.sh failed (run under `make test`, which installs patchelf):\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

/// The server binary inside `bundle`, with exactly the environment the image has.
fn image_command(bundle: &Path) -> Command {
    let mut command = Command::new(bundle.join("bin/stereo-recon"));
    command
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", std::env::temp_dir())
        .env("LD_LIBRARY_PATH", bundle.join("lib"))
        .current_dir(bundle);
    command
}

fn get(server: &ServerProcess, path: &str) -> (u16, Vec<u8>) {
    http(server.address, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
}

#[test]
fn bundle_serves_from_a_clean_environment() {
    let bundle = assemble("ok");

    // Nothing in the bundle may point back at the build machine.
    let dynamic = Command::new("readelf").arg("-d").arg(bundle.join("bin/stereo-recon")).output().unwrap();
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    let runpath = dynamic.lines().find(|l| l.contains("RUNPATH")).expect("a RUNPATH");
    assert!(runpath.contains("[$ORIGIN/../lib]"), "{runpath}");
    assert!(dynamic.contains("[libtorch_cuda.so]"), "CUDA dropped from the bundled binary");
    for file in ["lib/libtorch_cuda.so", "lib/libcudnn.so.9", "lib/libcublas.so.13", "lib/libc10.so"] {
        assert!(bundle.join(file).is_file(), "{file} not bundled");
    }
    assert!(!bundle.join("lib/libtorch_python.so").exists(), "Python-only library bundled");
    let manifest = std::fs::read_to_string(bundle.join("MANIFEST")).unwrap();
    for file in [
        "./models/psmnet_kitti2015.pt",
        "./models/psmnet_kitti2015.json",
        "./static/app.js",
        "./data/synthetic/left.png",
    ] {
        assert!(manifest.contains(file), "{file} missing from MANIFEST");
    }

    // As the image runs it: defaults point at models/, static/, data/ in the working directory.
    let mut command = image_command(&bundle);
    command.args(["serve", "--host", "127.0.0.1", "--port", "0"]);
    let mut server = ServerProcess::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(90);
    let health = loop {
        let (status, body) = get(&server, "/api/v1/health");
        if status == 200 {
            break serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(Instant::now() < deadline, "the bundled server did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    };
    // No GPU here: the auto device falls back to CPU with the CUDA libraries present.
    assert_eq!(health["device"], "cpu", "{health}");

    let (status, page) = get(&server, "/");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("/static/app.js"));
    assert_eq!(get(&server, "/static/app.js").0, 200);
    assert_eq!(get(&server, "/data/synthetic/left.png").0, 200);

    // One real disparity request, checked against eager PyTorch's answer.
    let (left, right) = fixture_pair();
    let (content_type, body) = multipart(&[("left", &left), ("right", &right)]);
    let mut request = format!(
        "POST /api/v1/disparity?format=pfm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let (status, body) = http(server.address, &request);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ours = pfm::decode(&body).unwrap();
    let reference = pfm::decode(&std::fs::read(repo().join("models/parity/synthetic_crop.pfm")).unwrap()).unwrap();
    assert_eq!((ours.width(), ours.height()), (reference.width(), reference.height()));
    let mean = ours.values().iter().zip(reference.values()).map(|(a, b)| (a - b).abs()).sum::<f32>()
        / ours.values().len() as f32;
    assert!(mean < 0.01, "bundled server differs from eager PyTorch by {mean} px on average");

    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    std::fs::remove_dir_all(&bundle).ok();
}

#[test]
fn bundle_missing_a_library_does_not_start() {
    let bundle = assemble("broken");
    // One library the CPU path touches first, one it never calls but the loader
    // still needs: either gone must stop the process before it serves anything.
    for library in ["libc10.so", "libcudnn.so.9"] {
        let hidden = bundle.join("lib").join(library);
        let aside = bundle.join(library);
        std::fs::rename(&hidden, &aside).unwrap();
        let mut child = image_command(&bundle)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().ok();
                panic!("the server started without {library}: it must be finding libraries outside the bundle");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "without {library}: {status:?}");
        assert!(
            stderr.contains(library) && stderr.contains("cannot open shared object file"),
            "without {library}: {stderr}"
        );
        std::fs::rename(&aside, &hidden).unwrap();
    }
    std::fs::remove_dir_all(&bundle).ok();
}
