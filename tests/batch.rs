//! `stereo-recon batch` from the built binary: every dataset layout and the
//! stereo-video path on small real inputs, outputs byte-equal to the API's for
//! the same pair, resume after a run is stopped or killed, a corrupt pair among
//! good ones, shards covering every pair exactly once, and clear errors.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use image::RgbImage;
use stereo_recon::calibration::formats;

const BIN: &str = env!("CARGO_BIN_EXE_stereo-recon");

/// A fresh folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stereo-recon-batch-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(image: &RgbImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

/// `batch` with the model on the CPU, then `args` (more may follow).
fn batch(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(["batch", "--device", "cpu", "--model"]).arg(model_path()).args(args);
    command
}

fn run(mut command: Command) -> (bool, String, String) {
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON lines of a `--json` run.
fn lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// What `POST /api/v1/disparity?format=...` answers for a pair (and calibration).
async fn api_answer(
    app: &axum::Router,
    format: &str,
    left: &[u8],
    right: &[u8],
    calibration: Option<&[u8]>,
) -> Vec<u8> {
    let mut fields: Vec<(&str, &[u8])> = vec![("left", left), ("right", right)];
    fields.extend(calibration.map(|c| ("calibration", c)));
    let reply = send(app, multipart_request(&format!("/api/v1/disparity?format={format}"), &fields)).await;
    assert_eq!(reply.status, axum::http::StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    reply.body.to_vec()
}

/// Small distinct pairs (a textured plane at `shift` px), as PNG bytes.
fn plane_pair(shift: u32) -> (Vec<u8>, Vec<u8>) {
    let (left, right) = shifted_pair(96, 64, shift);
    (png(&left), png(&right))
}

#[tokio::test]
async fn every_dataset_layout_gives_the_apis_bytes_and_a_bad_pair_is_named_and_skipped() {
    let dir = scratch("layouts");
    let data = dir.join("data");
    // KITTI 2015: two pairs, and a third whose left image is corrupt.
    let write = |path: &str, bytes: &[u8]| {
        let path = data.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    let pairs = [plane_pair(4), plane_pair(7), plane_pair(10), plane_pair(12)];
    write("kitti/training/image_2/000000_10.png", &pairs[0].0);
    write("kitti/training/image_3/000000_10.png", &pairs[0].1);
    write("kitti/training/image_2/000001_10.png", b"\x89PNG\r\n\x1a\n not really");
    write("kitti/training/image_3/000001_10.png", &pairs[1].1);
    write("kitti/training/image_2/000002_10.png", &pairs[1].0);
    write("kitti/training/image_3/000002_10.png", &pairs[1].1);
    // left/ + right/.
    write("lr/left/cam_a.png", &pairs[2].0);
    write("lr/right/cam_a.png", &pairs[2].1);
    // A Middlebury scene with its calib.txt (the rendered room, 256 x 192).
    let scene = small_scene();
    write("mb/Room/im0.png", &scene.left);
    write("mb/Room/im1.png", &scene.right);
    let calib_txt = formats::write_middlebury(&scene.calibration).unwrap();
    write("mb/Room/calib.txt", calib_txt.as_bytes());

    let out = dir.join("out");
    let inputs = ["kitti", "lr", "mb"].map(|i| data.join(i));
    let mut command = batch(&["--formats", "png16,pfm,uncertainty", "--json", "--out"]);
    command.arg(&out).args(&inputs);
    let (ok, stdout, stderr) = run(command);
    assert!(!ok, "a failed pair makes the exit status non-zero\n{stdout}{stderr}");
    let lines = lines(&stdout);
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(
        (summary["pairs"].as_u64(), summary["done"].as_u64(), summary["failed"].as_u64()),
        (Some(5), Some(4), Some(1)),
        "{summary}"
    );
    let failure = &summary["failures"][0];
    assert_eq!(failure["pair"], "000001_10");
    let reason = failure["reason"].as_str().unwrap();
    assert!(reason.contains("image_2/000001_10.png"), "the reason names the file: {reason}");
    assert_eq!(
        std::fs::read_to_string(out.join("summary.json"))
            .map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap())
            .unwrap(),
        *summary
    );

    // Same bytes as the API's for the same pair and options; names mirror the inputs.
    let app = app(ready_engine(2).await);
    let expected = [
        (out.join("kitti"), "000000_10", &pairs[0]),
        (out.join("kitti"), "000002_10", &pairs[1]),
        (out.join("lr"), "cam_a", &pairs[2]),
    ];
    for (folder, name, (left, right)) in expected {
        for (format, ext) in [("png16", "png"), ("pfm", "pfm"), ("uncertainty", "pfm")] {
            let written = std::fs::read(folder.join(format).join(format!("{name}.{ext}"))).unwrap();
            assert!(written == api_answer(&app, format, left, right, None).await, "{name} {format}");
        }
    }
    let room_pfm = std::fs::read(out.join("mb/pfm/Room.pfm")).unwrap();
    assert!(room_pfm == api_answer(&app, "pfm", &scene.left, &scene.right, None).await);

    // Depth: the Middlebury scene uses its own calib.txt; the KITTI pairs have none and say so.
    let mut command = batch(&["--formats", "depth16", "--out"]);
    command.arg(&out).args(&inputs);
    let (ok, stdout, _) = run(command);
    assert!(!ok);
    assert!(stdout.is_empty() || !stdout.contains("panicked"));
    let depth = std::fs::read(out.join("mb/depth16/Room.png")).unwrap();
    assert!(depth == api_answer(&app, "depth16", &scene.left, &scene.right, Some(calib_txt.as_bytes())).await);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let reasons: Vec<&str> =
        summary["failures"].as_array().unwrap().iter().map(|f| f["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().filter(|r| r.contains("--calib")).count() >= 3, "{reasons:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Six pairs in a left/ + right/ folder.
fn six_pairs(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    for k in 0..6u32 {
        let (left, right) = shifted_pair(96, 64, 3 + k);
        save(&left, &data.join(format!("left/p{k}.png")));
        save(&right, &data.join(format!("right/p{k}.png")));
    }
    data
}

/// Starts a `--json` run and reads its lines until `done` pairs are written.
fn start_and_wait(data: &Path, out: &Path, done: usize) -> (std::process::Child, Vec<serde_json::Value>) {
    let mut command = batch(&["--formats", "png16,color", "--json", "--pipeline-depth", "2", "--out"]);
    command.arg(out).arg(data).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let mut seen = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    while seen.iter().filter(|l: &&serde_json::Value| l["status"] == "done").count() < done {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the run ended early: {seen:?}");
        seen.push(serde_json::from_str(&line).unwrap());
    }
    // Keep reading in the background so the child never blocks on a full pipe.
    let rest = std::thread::spawn(move || reader.lines().map_while(Result::ok).collect::<Vec<_>>());
    std::mem::forget(rest);
    (child, seen)
}

#[test]
fn a_stopped_or_killed_run_resumes_without_doing_a_pair_twice() {
    let dir = scratch("resume");
    let data = six_pairs(&dir);
    let out = dir.join("out");
    let mut done_per_pair = std::collections::BTreeMap::<String, usize>::new();
    let count = |done_per_pair: &mut std::collections::BTreeMap<String, usize>, lines: &[serde_json::Value]| {
        for l in lines.iter().filter(|l| l["status"] == "done") {
            *done_per_pair.entry(l["pair"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    };

    // Ctrl-C after the first pair: the pair in flight is finished, the summary says so.
    let (mut child, _) = start_and_wait(&data, &out, 1);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted run exits non-zero");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["interrupted"], true, "{summary}");
    let after_stop = summary["done"].as_u64().unwrap();
    assert!((1..6).contains(&after_stop), "{summary}");

    // Killed outright after one more pair: nothing half-written may count as done.
    let (mut child, seen) = start_and_wait(&data, &out, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(seen.iter().filter(|l| l["status"] == "skipped").count() as u64, after_stop, "{seen:?}");
    count(&mut done_per_pair, &seen);
    let done_before_last = after_stop as usize + done_per_pair.len();

    let mut command = batch(&["--formats", "png16,color", "--json", "--out"]);
    command.arg(&out).arg(&data);
    let (ok, stdout, stderr) = run(command);
    assert!(ok, "{stdout}{stderr}");
    let last = lines(&stdout);
    // The killed run may have finished more pairs than were read from it before the kill; the last
    // run must find those whole and skip them, so each pair is either skipped or computed there.
    let skipped = last.iter().filter(|l| l["status"] == "skipped").count();
    let computed = last.iter().filter(|l| l["status"] == "done").count();
    assert_eq!(skipped + computed, 6, "{stdout}");
    assert!(skipped >= done_before_last, "{stdout}");
    count(&mut done_per_pair, &last);
    let summary = &last.last().unwrap()["summary"];
    assert_eq!(summary["failed"], 0);
    // Every file there is whole, and every pair was computed once after the first run.
    for k in 0..6 {
        for format in ["png16", "color"] {
            let bytes = std::fs::read(out.join(format).join(format!("p{k}.png"))).unwrap();
            image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("p{k} {format}: {e}"));
        }
    }
    assert!(done_per_pair.values().all(|&n| n == 1), "{done_per_pair:?}");

    // Nothing left: done in moments, without loading the network.
    let mut command = batch(&["--formats", "png16,color", "--out"]);
    command.arg(&out).arg(&data);
    let (ok, stdout, stderr) = run(command);
    assert!(ok && stdout.contains("0 written, 6 already done"), "{stdout}");
    assert!(!stderr.contains("model loaded"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shards_cover_every_pair_exactly_once() {
    let dir = scratch("shards");
    let data = six_pairs(&dir);
    let all = |shard: &str| {
        let mut command = batch(&["--dry-run", "--json", "--shard", shard, "--out"]);
        command.arg(dir.join("out")).arg(&data);
        let (ok, stdout, stderr) = run(command);
        assert!(ok, "{stderr}");
        lines(&stdout).into_iter().map(|l| l["pair"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let everything = all("0/1");
    assert_eq!(everything.len(), 6);
    for n in 1..=4 {
        let mut union: Vec<String> = (0..n).flat_map(|i| all(&format!("{i}/{n}"))).collect();
        union.sort();
        let mut expected = everything.clone();
        expected.sort();
        assert_eq!(union, expected, "{n} shards take every pair once");
    }
    let (ok, _, stderr) = run({
        let mut c = batch(&["--shard", "4/4", "--out", "x"]);
        c.arg(&data);
        c
    });
    assert!(!ok && stderr.contains("0 <= I < N"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Renders `frames` frames of the room seen by a rig moving right and forward.
fn moving_sequence(frames: usize, width: u32, height: u32) -> Vec<stereo_recon::synthetic::RenderedPair> {
    (0..frames)
        .map(|k| stereo_recon::synthetic::render_from(width, height, [0.05 * k as f64, 0.0, 0.1 * k as f64]))
        .collect()
}

/// Encodes RGB frames losslessly (FFV1), so the frames read back are the rendered pixels.
fn encode_video(frames: &[RgbImage], path: &Path, fps: u32) {
    let (w, h) = frames[0].dimensions();
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &format!("{w}x{h}")])
        .args(["-framerate", &fps.to_string(), "-i", "-", "-c:v", "ffv1", "-pix_fmt", "bgr0"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("ffmpeg runs (make test installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for frame in frames {
            stdin.write_all(frame.as_raw()).unwrap();
        }
    }
    assert!(child.wait().unwrap().success());
}

fn packed(left: &RgbImage, right: &RgbImage, side_by_side: bool) -> RgbImage {
    let (w, h) = left.dimensions();
    let mut frame = if side_by_side { RgbImage::new(2 * w, h) } else { RgbImage::new(w, 2 * h) };
    let (dx, dy) = if side_by_side { (w, 0) } else { (0, h) };
    image::imageops::replace(&mut frame, left, 0, 0);
    image::imageops::replace(&mut frame, right, i64::from(dx), i64::from(dy));
    frame
}

#[tokio::test]
async fn stereo_videos_are_read_frame_by_frame_with_exact_ground_truth() {
    let dir = scratch("video");
    let sequence = moving_sequence(4, 160, 128);
    let sbs: Vec<RgbImage> = sequence.iter().map(|p| packed(&p.left, &p.right, true)).collect();
    let tb: Vec<RgbImage> = sequence.iter().map(|p| packed(&p.left, &p.right, false)).collect();
    encode_video(&sbs, &dir.join("sbs.mkv"), 5);
    encode_video(&tb, &dir.join("tb.mkv"), 5);
    encode_video(&sequence.iter().map(|p| p.left.clone()).collect::<Vec<_>>(), &dir.join("l.mkv"), 5);
    encode_video(&sequence.iter().map(|p| p.right.clone()).collect::<Vec<_>>(), &dir.join("r.mkv"), 5);

    // Side by side, every frame, with the colour video.
    let mut command = batch(&["--layout", "sbs", "--formats", "pfm", "--video-out"]);
    command.arg(dir.join("disparity.mp4")).arg("--out").arg(dir.join("sbs")).arg(dir.join("sbs.mkv"));
    let (ok, stdout, stderr) = run(command);
    assert!(ok, "{stdout}{stderr}");
    let app = app(ready_engine(2).await);
    for (k, pair) in sequence.iter().enumerate() {
        let pfm = std::fs::read(dir.join(format!("sbs/pfm/frame_{k:06}.pfm"))).unwrap();
        assert!(pfm == api_answer(&app, "pfm", &png(&pair.left), &png(&pair.right), None).await, "frame {k}");
        let map = stereo_recon::codec::pfm::decode(&pfm).unwrap();
        let epe = stereo_recon::eval::evaluate(&map, &pair.disparity, 192.0).epe;
        assert!(epe < 2.0, "frame {k}: EPE {epe} px against the exact disparity");
        assert!(dir.join(format!("sbs/color/frame_{k:06}.png")).is_file(), "--video-out keeps the colour frames");
    }
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames,width,height", "-of", "csv=p=0"])
        .arg(dir.join("disparity.mp4"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "160,128,4");

    // Top and bottom, from 0.2 s (frame 1), every second frame; two files, the first 0.4 s.
    let mut command = batch(&["--layout", "tb", "--formats", "pfm", "--start", "0.2", "--every", "2", "--out"]);
    command.arg(dir.join("tb")).arg(dir.join("tb.mkv"));
    let (ok, stdout, stderr) = run(command);
    assert!(ok, "{stdout}{stderr}");
    let mut command = batch(&["--formats", "pfm", "--duration", "0.4", "--left-video"]);
    command.arg(dir.join("l.mkv")).arg("--right-video").arg(dir.join("r.mkv")).arg("--out").arg(dir.join("two"));
    let (ok, stdout, stderr) = run(command);
    assert!(ok, "{stdout}{stderr}");
    let names = |folder: &str| {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(folder).join("pfm"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names("tb"), ["frame_000001.pfm", "frame_000003.pfm"]);
    assert_eq!(names("two"), ["frame_000000.pfm", "frame_000001.pfm"]);
    for (folder, k) in [("tb", 1), ("tb", 3), ("two", 0), ("two", 1)] {
        let file = dir.join(folder).join(format!("pfm/frame_{k:06}.pfm"));
        let same = std::fs::read(dir.join(format!("sbs/pfm/frame_{k:06}.pfm"))).unwrap();
        assert!(std::fs::read(&file).unwrap() == same, "{}: every layout gives the same frame", file.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_options_and_a_missing_ffmpeg_are_told_before_any_work() {
    let dir = scratch("errors");
    let data = six_pairs(&dir);
    std::fs::write(dir.join("clip.mkv"), b"not a video").unwrap();
    let cases: Vec<(Vec<&str>, Vec<PathBuf>, &str)> = vec![
        (vec!["--formats", "gif"], vec![data.clone()], "unknown format \"gif\""),
        (vec!["--formats", "png16", "--max-uncertainty=-1"], vec![data.clone()], "--max-uncertainty"),
        (vec!["--scale", "2"], vec![data.clone()], "--scale 2: give a factor from 0.25 to 1"),
        (vec![], vec![dir.join("missing")], "no such file or folder"),
        (vec![], vec![dir.join("clip.mkv")], "needs --layout"),
        (vec!["--layout", "sbs"], vec![dir.join("clip.mkv")], "clip.mkv"),
        (vec!["--video-out", "v.mp4"], vec![data.clone()], "exactly one video input"),
        (vec![], vec![dir.join("out")], "no stereo pairs"),
    ];
    std::fs::create_dir_all(dir.join("out")).unwrap();
    for (options, inputs, message) in cases {
        let mut command = batch(&options);
        command.arg("--out").arg(dir.join("o")).args(&inputs);
        let (ok, _, stderr) = run(command);
        assert!(!ok && stderr.contains(message), "{options:?}: {stderr}");
        assert!(!stderr.contains("model loaded") && !stderr.contains("panicked"), "{stderr}");
    }
    // Without ffmpeg on PATH, a video input names the program and how to get it.
    let mut command = batch(&["--layout", "sbs", "--out"]);
    command.arg(dir.join("o")).arg(dir.join("clip.mkv")).env("PATH", "/nonexistent");
    let (ok, _, stderr) = run(command);
    assert!(!ok && stderr.contains("ffprobe") && stderr.contains("apt-get install ffmpeg"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_scaled_run_writes_scaled_outputs_and_says_so() {
    let dir = scratch("scaled");
    let data = six_pairs(&dir);
    let mut command = batch(&["--formats", "png16", "--scale", "0.5", "--json", "--out"]);
    command.arg(dir.join("out")).arg(&data);
    let (ok, stdout, stderr) = run(command);
    assert!(ok, "{stdout}{stderr}");
    let summary = lines(&stdout).last().unwrap()["summary"].clone();
    assert_eq!(summary["options"]["scale"], 0.5, "{summary}");
    for k in 0..6 {
        let png = image::open(dir.join(format!("out/png16/p{k}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (48, 32), "p{k}: half of 96 x 64");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_scores_kitti_and_middlebury_folders_in_one_call() {
    let dir = scratch("eval");
    // KITTI: a plane 6 px away everywhere, its ground truth in disp_occ_0/ (16-bit PNG).
    let (left, right) = shifted_pair(96, 64, 6);
    save(&left, &dir.join("kitti/image_2/000000_10.png"));
    save(&right, &dir.join("kitti/image_3/000000_10.png"));
    let truth = stereo_recon::disparity::DisparityMap::new(96, 64, vec![6.0; 96 * 64]).unwrap();
    std::fs::create_dir_all(dir.join("kitti/disp_occ_0")).unwrap();
    std::fs::write(dir.join("kitti/disp_occ_0/000000_10.png"), stereo_recon::codec::kitti::encode_png16(&truth))
        .unwrap();
    // Middlebury: the room, scored only where mask0nocc.png is 255 (its left half here).
    let scene = small_scene();
    let room = dir.join("middlebury/Room");
    std::fs::create_dir_all(&room).unwrap();
    std::fs::write(room.join("im0.png"), &scene.left).unwrap();
    std::fs::write(room.join("im1.png"), &scene.right).unwrap();
    std::fs::write(room.join("disp0GT.pfm"), stereo_recon::codec::pfm::encode(&scene.truth)).unwrap();
    let mask = image::GrayImage::from_fn(256, 192, |x, _| image::Luma([if x < 128 { 255 } else { 128 }]));
    mask.save(room.join("mask0nocc.png")).unwrap();

    let output = Command::new(BIN)
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(model_path())
        .arg(dir.join("kitti"))
        .arg(dir.join("middlebury"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let pairs = report["pairs"].as_array().unwrap();
    assert_eq!(pairs.iter().map(|p| p["name"].as_str().unwrap()).collect::<Vec<_>>(), ["000000_10", "Room"]);
    assert_eq!(pairs[0]["metrics"]["valid_pixels"], 96 * 64);
    let seen_left_half = scene
        .truth
        .values()
        .chunks(256)
        .flat_map(|row| &row[..128])
        .filter(|t| t.is_finite() && **t > 0.0 && **t < 192.0)
        .count();
    assert_eq!(pairs[1]["metrics"]["valid_pixels"].as_u64(), Some(seen_left_half as u64), "the mask is applied");
    assert!(pairs[1]["metrics"]["epe"].as_f64().unwrap() < 2.0, "{}", pairs[1]);
    std::fs::remove_dir_all(&dir).ok();
}
