//! The HTTP API, driven in process with the real exported model on CPU:
//! every output format, every error case, health, model info and the page.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage, Rgba};
use serde_json::json;
use stereo_recon::codec::{kitti, pfm};
use stereo_recon::Limits;

const CHECKPOINT_SHA256: &str = "1ef1b757f0ca909c6fae20281dc0283965e8d47e034e47502dcb16f845ad143d";

// ---- Output formats ---------------------------------------------------------------

#[tokio::test]
async fn multipart_json_answer_has_stats_timings_and_images() {
    let app = app(ready_engine(2).await);
    let (left, right) = fixture_pair();
    let reply = send(&app, multipart_request("/api/v1/disparity", &[("left", &left), ("right", &right)])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    assert!(reply.header("content-type").starts_with("application/json"));
    let body = reply.json();
    assert_eq!((body["width"].as_u64(), body["height"].as_u64()), (Some(300), Some(250)));
    assert_eq!(body["device"], "cpu");
    assert_eq!(body["model"], "psmnet-kitti2015");
    assert_eq!(body["precision"], "fp32", "auto is fp32 on the CPU");
    let (min, max, mean) = (
        body["disparity"]["min"].as_f64().unwrap(),
        body["disparity"]["max"].as_f64().unwrap(),
        body["disparity"]["mean"].as_f64().unwrap(),
    );
    // The crop sees the back wall (~8 px) up to the near sphere (~30 px).
    assert!(min > 3.0 && min <= mean && mean <= max && max < 45.0, "{min} {mean} {max}");
    let t = &body["timings_ms"];
    for key in ["decode_ms", "queue_ms", "inference_ms", "encode_ms", "total_ms"] {
        assert!(t[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {t}");
    }
    assert!(t["inference_ms"].as_f64().unwrap() > 0.0);
    assert!(t["total_ms"].as_f64().unwrap() >= t["inference_ms"].as_f64().unwrap());
    assert!(reply.header("server-timing").contains("inference;dur="));

    let color = image::load_from_memory(&unb64(&body["images"]["color_png"])).unwrap();
    assert_eq!((color.width(), color.height(), color.color()), (300, 250, image::ColorType::Rgb8));
    let png16 = kitti::decode_png16(&unb64(&body["images"]["kitti_png16"])).unwrap();
    assert_eq!((png16.width(), png16.height()), (300, 250));
    let stats = png16.stats();
    assert!((f64::from(stats.mean) - mean).abs() < 0.01, "{} vs {mean}", stats.mean);
    assert!(body["images"].get("pfm").is_none(), "PFM is opt-in");
}

#[tokio::test]
async fn json_body_with_base64_and_pfm_agrees_with_png16() {
    let app = app(ready_engine(2).await);
    let (left, right) = small_pair();
    let request = json_request(
        "/api/v1/disparity?format=json&include_pfm=true",
        // A data-URL prefix, as a browser's FileReader produces, is accepted.
        &json!({ "left": format!("data:image/png;base64,{}", b64(&left)), "right": b64(&right) }),
    );
    let reply = send(&app, request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    let body = reply.json();
    let exact = pfm::decode(&unb64(&body["images"]["pfm"])).unwrap();
    let coarse = kitti::decode_png16(&unb64(&body["images"]["kitti_png16"])).unwrap();
    assert_eq!((exact.width(), exact.height()), (64, 48));
    for (d, q) in exact.values().iter().zip(coarse.values()) {
        assert!((d - q).abs() <= 0.5 / 256.0 + 1e-6, "png16 {q} is not round(256 * {d}) / 256");
    }
    let mean = exact.stats().mean;
    assert!((f64::from(mean) - body["disparity"]["mean"].as_f64().unwrap()).abs() < 1e-4);
}

#[tokio::test]
async fn raw_formats_return_files_with_headers() {
    let app = app(ready_engine(2).await);
    let (left, right) = small_pair();
    let fields: [(&str, &[u8]); 2] = [("left", &left), ("right", &right)];

    let reply = send(&app, multipart_request("/api/v1/disparity?format=png16", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "image/png");
    let png16 = kitti::decode_png16(&reply.body).unwrap();
    assert_eq!((png16.width(), png16.height()), (64, 48));
    let header_mean: f32 = reply.header("x-disparity-mean").parse().unwrap();
    assert!((png16.stats().mean - header_mean).abs() < 0.01);
    assert_eq!(reply.header("x-device"), "cpu");

    let reply = send(&app, multipart_request("/api/v1/disparity?format=color", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "image/png");
    let color = image::load_from_memory(&reply.body).unwrap();
    assert_eq!((color.width(), color.height(), color.color()), (64, 48, image::ColorType::Rgb8));

    let reply = send(&app, multipart_request("/api/v1/disparity?format=pfm", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/x-portable-floatmap");
    assert!(reply.header("content-disposition").contains("disparity.pfm"));
    let map = pfm::decode(&reply.body).unwrap();
    assert_eq!((map.width(), map.height()), (64, 48));
    // CPU inference is deterministic: the PFM is the PNG's source, to 1/512 px.
    for (d, q) in map.values().iter().zip(png16.values()) {
        assert!((d - q).abs() <= 0.5 / 256.0 + 1e-6);
        assert!((0.0..192.0).contains(d));
    }
}

#[tokio::test]
async fn grey_sixteen_bit_and_alpha_inputs_are_accepted() {
    let app = app(ready_engine(2).await);
    let (left, right) = small_pair();
    let left = image::load_from_memory(&left).unwrap();
    let right = image::load_from_memory(&right).unwrap();
    // Left as 16-bit grey TIFF, right as RGBA WebP-lossless... each side its own kind.
    let grey16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(64, 48, |x, y| {
        let p = left.to_rgb8().get_pixel(x, y).0;
        Luma([(u16::from(p[0]) + u16::from(p[1]) + u16::from(p[2])) * 85])
    });
    let rgba = ImageBuffer::from_fn(64, 48, |x, y| {
        let p = right.to_rgb8().get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], 128])
    });
    for (l, r) in [
        (encode(&DynamicImage::ImageLuma16(grey16.clone()), ImageFormat::Tiff), encode(&right, ImageFormat::Png)),
        (encode(&left, ImageFormat::Bmp), encode(&DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::WebP)),
        (encode(&left, ImageFormat::Jpeg), encode(&right, ImageFormat::Jpeg)),
    ] {
        let reply = send(&app, multipart_request("/api/v1/disparity?format=pfm", &[("left", &l), ("right", &r)])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
        assert_eq!(pfm::decode(&reply.body).unwrap().width(), 64);
    }
}

#[tokio::test]
async fn ground_truth_upload_adds_scores_and_an_error_map() {
    let app = app(ready_engine(2).await);
    let (left, right) = fixture_pair();
    let truth = read_png("tests/fixtures/synthetic_crop/disp_gt.pfm");
    let fields: [(&str, &[u8]); 3] = [("left", &left), ("right", &right), ("ground_truth", &truth)];
    let reply = send(&app, multipart_request("/api/v1/disparity", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    let body = reply.json();
    let eval = &body["evaluation"];
    assert_eq!(eval["valid_pixels"], 300 * 250);
    assert_eq!(eval["excluded_pixels"], 0);
    let epe = eval["epe"].as_f64().unwrap();
    assert!(epe > 0.0 && epe < 1.0, "EPE {epe}");
    assert!(eval["d1"].as_f64().unwrap() < 5.0);
    assert!(eval["bad1"].as_f64().unwrap() >= eval["bad3"].as_f64().unwrap());
    let errors = image::load_from_memory(&unb64(&body["images"]["error_png"])).unwrap();
    assert_eq!((errors.width(), errors.height()), (300, 250));

    // The same scores arrive as headers with a raw format, and via a JSON body as 16-bit PNG.
    let as_png16 = kitti::encode_png16(&pfm::decode(&truth).unwrap());
    let request = json_request(
        "/api/v1/disparity?format=png16",
        &json!({ "left": b64(&left), "right": b64(&right), "ground_truth": b64(&as_png16) }),
    );
    let reply = send(&app, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    let header_epe: f64 = reply.header("x-eval-epe").parse().unwrap();
    assert!((header_epe - epe).abs() < 0.01, "{header_epe} vs {epe}");
}

// ---- Errors -----------------------------------------------------------------------

async fn expect_error(app: &axum::Router, request: Request<Body>, status: StatusCode, code: &str) -> Reply {
    let reply = send(app, request).await;
    assert_eq!(reply.status, status, "{}", String::from_utf8_lossy(&reply.body));
    assert!(reply.header("content-type").starts_with("application/json"));
    assert_eq!(reply.error_code(), code);
    reply
}

fn gif() -> Vec<u8> {
    // A real 1x1 GIF: recognised, but not a format we take.
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec()
}

#[tokio::test]
async fn upload_errors_are_clear_json_with_the_right_status() {
    // Validation happens before inference, so a model-less engine suffices.
    let app = app(failed_engine().await);
    let (left, right) = small_pair();
    let uri = "/api/v1/disparity";
    let bad = StatusCode::BAD_REQUEST;

    expect_error(&app, multipart_request(uri, &[("left", &left)]), bad, "missing_field").await;
    expect_error(&app, multipart_request(uri, &[("right", &right)]), bad, "missing_field").await;
    expect_error(&app, multipart_request(uri, &[("image", &left), ("right", &right)]), bad, "unexpected_field").await;
    expect_error(
        &app,
        multipart_request(uri, &[("left", &left), ("left", &left), ("right", &right)]),
        bad,
        "duplicate_field",
    )
    .await;
    expect_error(&app, multipart_request(uri, &[("left", b""), ("right", &right)]), bad, "empty_image").await;
    expect_error(
        &app,
        multipart_request(uri, &[("left", b"%PDF-1.4 not an image"), ("right", &right)]),
        bad,
        "invalid_image",
    )
    .await;
    let truncated = &left[..left.len() / 2];
    expect_error(&app, multipart_request(uri, &[("left", &left), ("right", truncated)]), bad, "invalid_image").await;
    let jpeg = encode(&image::load_from_memory(&left).unwrap(), ImageFormat::Jpeg);
    expect_error(
        &app,
        multipart_request(uri, &[("left", &left), ("right", &jpeg[..jpeg.len() / 3])]),
        bad,
        "invalid_image",
    )
    .await;
    expect_error(
        &app,
        multipart_request(uri, &[("left", &gif()), ("right", &right)]),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_image_format",
    )
    .await;
    let smaller = png(&RgbImage::from_pixel(32, 48, Rgb([9, 9, 9])));
    let reply =
        expect_error(&app, multipart_request(uri, &[("left", &left), ("right", &smaller)]), bad, "size_mismatch").await;
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("64x48"));

    // Ground truth that cannot be used.
    let tiny_truth = pfm::encode(&stereo_recon::disparity::DisparityMap::new(2, 2, vec![1.0; 4]).unwrap());
    let fields: [(&str, &[u8]); 3] = [("left", &left), ("right", &right), ("ground_truth", &tiny_truth)];
    expect_error(&app, multipart_request(uri, &fields), bad, "ground_truth_size_mismatch").await;
    let fields: [(&str, &[u8]); 3] = [("left", &left), ("right", &right), ("ground_truth", b"not a disparity")];
    expect_error(&app, multipart_request(uri, &fields), bad, "invalid_ground_truth").await;
    let grey8 = encode(&DynamicImage::ImageLuma8(ImageBuffer::from_pixel(64, 48, Luma([40u8]))), ImageFormat::Png);
    let fields: [(&str, &[u8]); 3] = [("left", &left), ("right", &right), ("ground_truth", &grey8)];
    let reply = expect_error(&app, multipart_request(uri, &fields), bad, "invalid_ground_truth").await;
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("scale"));

    // JSON bodies.
    expect_error(&app, json_request(uri, &json!({ "left": b64(&left) })), bad, "missing_field").await;
    expect_error(&app, json_request(uri, &json!({ "left": "%%%", "right": b64(&right) })), bad, "invalid_base64").await;
    expect_error(&app, json_request(uri, &json!({ "left": 1, "right": 2 })), bad, "invalid_json").await;
    expect_error(
        &app,
        json_request(uri, &json!({ "left": b64(&left), "right": b64(&right), "rigth": "" })),
        bad,
        "unexpected_field",
    )
    .await;
    let not_json =
        Request::post(uri).header("content-type", "application/json").body(Body::from("{\"left\": ")).unwrap();
    expect_error(&app, not_json, bad, "invalid_json").await;
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep = Request::post(uri).header("content-type", "application/json").body(Body::from(nested)).unwrap();
    expect_error(&app, deep, bad, "invalid_json").await;

    // Content types and query.
    let text = Request::post(uri).header("content-type", "text/plain").body(Body::from("hi")).unwrap();
    expect_error(&app, text, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let none = Request::post(uri).body(Body::from("hi")).unwrap();
    expect_error(&app, none, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let fields: [(&str, &[u8]); 2] = [("left", &left), ("right", &right)];
    expect_error(&app, multipart_request("/api/v1/disparity?format=gif", &fields), bad, "invalid_query").await;
    expect_error(&app, multipart_request("/api/v1/disparity?colour=1", &fields), bad, "invalid_query").await;
}

#[tokio::test]
async fn size_limits_answer_413() {
    let engine = failed_engine().await;
    let limits = Limits { max_upload_bytes: 20_000, max_pixels: 64 * 48 - 1, ..DEFAULT_LIMITS };
    let app = stereo_recon::router(state(engine, limits));
    let (left, right) = small_pair();
    let uri = "/api/v1/disparity";
    let reply = expect_error(
        &app,
        multipart_request(uri, &[("left", &left), ("right", &right)]),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_pixels",
    )
    .await;
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("3072 pixels"));

    let big = vec![7u8; 30_000];
    expect_error(
        &app,
        multipart_request(uri, &[("left", &big), ("right", &right)]),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    expect_error(
        &app,
        json_request(uri, &json!({ "left": b64(&big), "right": b64(&right) })),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    // Without a Content-Length (streamed), the limit still holds while reading.
    let stream = futures_stream(vec![Bytes::from(vec![b' '; 15_000]), Bytes::from(vec![b' '; 15_000])]);
    let request = Request::post(uri).header("content-type", "application/json").body(stream).unwrap();
    expect_error(&app, request, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
}

/// A body that arrives in chunks, without a Content-Length.
fn futures_stream(chunks: Vec<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>)))
}

use bytes::Bytes;

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_others_succeed() {
    // Queue depth 1: one request runs, one waits, the rest are refused at once.
    let app = app(ready_engine(1).await);
    let (left, right) = fixture_pair();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let app = app.clone();
        let (l, r) = (left.clone(), right.clone());
        tasks.push(tokio::spawn(async move {
            send(&app, multipart_request("/api/v1/disparity?format=png16", &[("left", &l), ("right", &r)])).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.error_code(), "queue_full");
                let retry: u64 = reply.header("retry-after").parse().expect("Retry-After in seconds");
                assert!(retry >= 1);
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&reply.body)),
        }
    }
    assert!(ok >= 1 && refused >= 1 && ok + refused == 4, "{ok} served, {refused} refused");
    assert!(ok <= 2, "at most the running and the queued request can be served, got {ok}");
}

#[tokio::test]
async fn without_a_model_requests_get_503_and_health_says_failed() {
    let app = app(failed_engine().await);
    let (left, right) = small_pair();
    let reply = send(&app, multipart_request("/api/v1/disparity", &[("left", &left), ("right", &right)])).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "engine_unavailable");
    assert!(!reply.json()["error"]["message"].as_str().unwrap().contains("nonexistent"), "paths are not leaked");
    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json()["status"], "failed");
    assert_eq!(get(&app, "/api/v1/model").await.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = app(failed_engine().await);
    let reply = get(&app, "/api/v1/nothing-here").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "not_found");
    let reply = get(&app, "/api/v1/disparity").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");
}

// ---- Health, model, page ----------------------------------------------------------

#[tokio::test]
async fn health_and_model_describe_the_loaded_network() {
    let engine = stereo_recon::engine::Engine::start(engine_config(model_path(), 3)).unwrap();
    let app = app(engine.clone());
    // Before the warm-up finishes, health is 503 "loading"; afterwards 200.
    let early = get(&app, "/api/v1/health").await;
    if early.status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(early.json()["status"], "loading");
        assert_eq!(early.error_code(), "model_loading");
    }
    engine.wait_ready().await.unwrap();
    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "ready");
    assert_eq!(health.json()["queue"]["depth"], 3);

    let model = get(&app, "/api/v1/model").await;
    assert_eq!(model.status, StatusCode::OK);
    let m = model.json();
    assert_eq!(m["name"], "psmnet-kitti2015");
    assert_eq!(m["weights_sha256"], CHECKPOINT_SHA256);
    assert_eq!(m["parameters"], 5_224_768);
    assert_eq!(m["maxdisp"], 192);
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["precision"], "fp32");
    assert!(m["libtorch_version"].as_str().unwrap().starts_with("2.11.0"), "{m}");
    assert_eq!(m["cuda_linked"], true);
    assert_eq!(m["input"]["size_multiple"], 16);
    assert_eq!(m["input"]["min_size"], 256);
    assert_eq!(m["input"]["max_pixels"], DEFAULT_LIMITS.max_pixels);
    assert_eq!(m["model_file_sha256"].as_str().unwrap().len(), 64);
    // Every answer format is listed, each once, split by whether it needs a calibration.
    assert_eq!(m["output"]["formats"], serde_json::json!(["json", "png16", "color", "pfm", "uncertainty"]));
    assert_eq!(
        m["output"]["with_calibration"]["formats"],
        serde_json::json!(["depth", "depth16", "ply", "depth_uncertainty"])
    );
}

#[tokio::test]
async fn page_is_served_with_its_assets_and_examples() {
    let app = app(failed_engine().await);
    let page = get(&app, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.header("content-type").starts_with("text/html"));
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    for needle in [
        "/static/app.js",
        "/static/style.css",
        "Compute disparity",
        "Try an example",
        "id=\"drop-left\"",
        "id=\"drop-right\"",
    ] {
        assert!(html.contains(needle), "page lacks {needle}");
    }
    let js = get(&app, "/static/app.js").await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.header("content-type").contains("javascript"));
    assert!(String::from_utf8_lossy(&js.body).contains("/api/v1/disparity"));
    let css = get(&app, "/static/style.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.header("content-type").starts_with("text/css"));

    let examples = get(&app, "/api/v1/examples").await.json();
    let synthetic =
        examples["examples"].as_array().unwrap().iter().find(|e| e["name"] == "synthetic").expect("synthetic example");
    for key in ["left", "right", "ground_truth", "calibration"] {
        let url = synthetic[key].as_str().unwrap();
        assert_eq!(get(&app, url).await.status, StatusCode::OK, "{url}");
    }
}
