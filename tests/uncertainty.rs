//! The disparity's uncertainty through the HTTP API, with the real network:
//! the deviation as a file and in the JSON answer, the depth's deviation, the
//! PLY's per-point deviations, and `max_uncertainty` masking the same pixels in
//! every format.

mod common;

use axum::http::StatusCode;
use common::*;
use stereo_recon::calibration::formats;
use stereo_recon::codec::{kitti, pfm};
use stereo_recon::disparity::DisparityMap;

fn float(value: &ply_rs::ply::Property) -> f32 {
    match value {
        ply_rs::ply::Property::Float(v) => *v,
        other => panic!("not a float: {other:?}"),
    }
}

/// Pixels (indices) without a value in a decoded map.
fn no_value(map: &DisparityMap) -> Vec<usize> {
    map.values().iter().enumerate().filter(|(_, v)| !v.is_finite()).map(|(i, _)| i).collect()
}

#[tokio::test]
async fn max_uncertainty_masks_the_same_pixels_in_every_format() {
    let app = app(ready_engine(1).await);
    let scene = small_scene();
    let calib = formats::write_json(&scene.calibration);
    let truth = pfm::encode(&scene.truth);
    let fields: [(&str, &[u8]); 3] =
        [("left", &scene.left), ("right", &scene.right), ("calibration", calib.as_bytes())];
    let with_truth: [(&str, &[u8]); 4] = [fields[0], fields[1], fields[2], ("ground_truth", &truth)];

    // The whole answer first: the deviation of every pixel, and what it says.
    let reply = send(&app, multipart_request("/api/v1/disparity?include_pfm=true", &with_truth)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.headers.get("x-masked-pixels"), None);
    let whole = reply.json();
    let disparity = pfm::decode(&unb64(&whole["images"]["pfm"])).unwrap();
    let sigma = pfm::decode(&unb64(&whole["images"]["uncertainty_pfm"])).unwrap();
    assert_eq!((sigma.width(), sigma.height()), (256, 192));
    assert!(sigma.values().iter().all(|s| s.is_finite() && *s >= 0.0 && *s < 192.0), "a deviation in px");
    let u = &whole["uncertainty"];
    let stats = stereo_recon::uncertainty::stats(&sigma);
    assert_eq!(u["median"].as_f64().unwrap() as f32, stats.median);
    assert_eq!(u["p90"].as_f64().unwrap() as f32, stats.p90);
    assert!((u["mean"].as_f64().unwrap() as f32 - stats.mean).abs() < 1e-5);
    assert_eq!(u["masked_pixels"], 0);
    assert!(u["max_uncertainty"].is_null());
    let colours = image::load_from_memory(&unb64(&whole["images"]["uncertainty_png"])).unwrap().into_rgb8();
    assert_eq!(colours.dimensions(), (256, 192));
    assert!(u["color_max"].as_f64().unwrap() > stats.p90 as f64);
    // Ranking by the deviation helps: the most certain half has the smaller error.
    let kept = &whole["sparsification"]["kept"];
    assert_eq!(kept[3]["fraction"], 0.5);
    assert!(kept[3]["epe"].as_f64() < kept[0]["epe"].as_f64(), "{kept}");

    // The depth's deviation is Z^2 / (f B) times the disparity's.
    let camera = &whole["reconstruction"]["camera"];
    let f_b = camera["fx"].as_f64().unwrap() * camera["baseline"].as_f64().unwrap();
    let depth = pfm::decode(&unb64(&whole["images"]["depth_pfm"])).unwrap();
    let depth_sigma = pfm::decode(&unb64(&whole["images"]["depth_uncertainty_pfm"])).unwrap();
    for ((&z, &sz), &s) in depth.values().iter().zip(depth_sigma.values()).zip(sigma.values()) {
        if z.is_finite() {
            let expected = f64::from(z).powi(2) / f_b * f64::from(s);
            assert!((f64::from(sz) - expected).abs() <= 1e-5 * expected.max(1e-3), "{sz} vs {expected}");
        } else {
            assert!(sz.is_infinite(), "no depth, so no depth deviation");
        }
    }
    let depth_u = &whole["reconstruction"]["depth_uncertainty"];
    assert!(depth_u["median"].as_f64().unwrap() > 0.0, "{depth_u}");

    // Half the pixels are above the median deviation: those lose their value.
    let limit = stats.median;
    let expected: Vec<usize> = (0..sigma.values().len()).filter(|&i| sigma.values()[i] > limit).collect();
    assert!(expected.len() > 1000 && expected.len() < sigma.values().len() / 2 + 1, "{}", expected.len());
    let masked_request = |format: &str, extra: &str| {
        multipart_request(&format!("/api/v1/disparity?format={format}&max_uncertainty={limit}{extra}"), &fields)
    };
    let mut answers = std::collections::BTreeMap::new();
    for (format, extra) in [
        ("json", "&include_pfm=true"),
        ("pfm", ""),
        ("png16", ""),
        ("color", ""),
        ("uncertainty", ""),
        ("depth", ""),
        ("depth16", ""),
        ("depth_uncertainty", ""),
        ("ply", "&ply_uncertainty=true"),
    ] {
        let reply = send(&app, masked_request(format, extra)).await;
        assert_eq!(reply.status, StatusCode::OK, "{format}: {}", String::from_utf8_lossy(&reply.body));
        if format != "json" {
            assert_eq!(reply.header("x-masked-pixels"), expected.len().to_string(), "{format}");
        }
        answers.insert(format, reply.body);
    }

    let json: serde_json::Value = serde_json::from_slice(&answers["json"]).unwrap();
    assert_eq!(json["uncertainty"]["masked_pixels"].as_u64(), Some(expected.len() as u64));
    assert_eq!(json["uncertainty"]["max_uncertainty"].as_f64().map(|v| v as f32), Some(limit));
    let shown = pfm::decode(&answers["pfm"]).unwrap();
    assert_eq!(no_value(&shown), expected, "pfm: +inf exactly where the deviation is above the limit");
    for (i, (&m, &d)) in shown.values().iter().zip(disparity.values()).enumerate() {
        assert!(!m.is_finite() || (m - d).abs() < 1e-4, "pixel {i} kept but changed: {m} vs {d}");
    }
    assert_eq!(pfm::decode(&unb64(&json["images"]["pfm"])).unwrap(), shown, "json's pfm");
    for (what, bytes) in [("png16", answers["png16"].to_vec()), ("json's png16", unb64(&json["images"]["kitti_png16"]))]
    {
        assert_eq!(no_value(&kitti::decode_png16(&bytes).unwrap()), expected, "{what}: 0 where masked");
    }
    for (what, bytes) in [("color", answers["color"].to_vec()), ("json's colour", unb64(&json["images"]["color_png"]))]
    {
        let rgb = image::load_from_memory(&bytes).unwrap().into_rgb8();
        let black: Vec<usize> = rgb.pixels().enumerate().filter(|(_, p)| p.0 == [0, 0, 0]).map(|(i, _)| i).collect();
        assert_eq!(black, expected, "{what}: black exactly where masked");
    }
    // The deviation outputs keep every pixel: they say why the others went.
    assert_eq!(pfm::decode(&answers["uncertainty"]).unwrap(), sigma);
    assert_eq!(pfm::decode(&unb64(&json["images"]["uncertainty_pfm"])).unwrap(), sigma);

    // Depth: every masked pixel has none, counted as too uncertain, in each depth format.
    let depth = pfm::decode(&answers["depth"]).unwrap();
    let depth_gone = no_value(&depth);
    assert!(expected.iter().all(|i| depth_gone.binary_search(i).is_ok()), "a masked pixel kept its depth");
    let stats = &json["reconstruction"]["depth"];
    assert_eq!(stats["too_uncertain_pixels"].as_u64(), Some(expected.len() as u64), "{stats}");
    let valid = stats["valid_pixels"].as_u64().unwrap() as usize;
    assert_eq!(depth.values().len() - depth_gone.len(), valid);
    let mm = image::load_from_memory(&answers["depth16"]).unwrap().into_luma16();
    assert!(expected.iter().all(|&i| mm.as_raw()[i] == 0), "depth16: 0 where masked");
    assert_eq!(no_value(&pfm::decode(&answers["depth_uncertainty"]).unwrap()), depth_gone);

    // The point cloud: one point per pixel with depth, each with its deviations.
    let ply = read_ply(&answers["ply"]);
    let vertices = &ply.payload["vertex"];
    assert_eq!(vertices.len(), valid, "masked pixels are left out of the cloud");
    let kept_sigma: Vec<f32> =
        depth.values().iter().zip(sigma.values()).filter(|(z, _)| z.is_finite()).map(|(_, &s)| s).collect();
    for (v, &s) in vertices.iter().zip(&kept_sigma) {
        let (sd, sz, z) = (float(&v["sigma_disparity"]), float(&v["sigma_depth"]), float(&v["z"]));
        assert!(sd <= limit, "a point above the limit: {sd}");
        assert_eq!(sd, s);
        let expected = f64::from(z).powi(2) / f_b * f64::from(sd);
        assert!((f64::from(sz) - expected).abs() <= 1e-4 * expected.max(1e-3), "{sz} vs {expected}");
    }
}

#[tokio::test]
async fn the_scores_of_kept_pixels_come_with_a_ground_truth() {
    let app = app(ready_engine(1).await);
    let scene = small_scene();
    let truth = pfm::encode(&scene.truth);
    let fields: [(&str, &[u8]); 3] = [("left", &scene.left), ("right", &scene.right), ("ground_truth", &truth)];
    let reply = send(&app, multipart_request("/api/v1/disparity?max_uncertainty=0.5", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
    let json = reply.json();
    let (all, kept) = (&json["evaluation"], &json["evaluation_kept"]);
    assert!(kept["valid_pixels"].as_u64() < all["valid_pixels"].as_u64(), "{kept} vs {all}");
    assert!(kept["epe"].as_f64() < all["epe"].as_f64(), "the kept pixels are the better ones: {kept} vs {all}");
    // Without a limit there is nothing kept apart to score.
    let reply = send(&app, multipart_request("/api/v1/disparity", &fields)).await;
    assert!(reply.json().get("evaluation_kept").is_none());
}

#[tokio::test]
async fn bad_uncertainty_queries_answer_400_before_inference() {
    let app = app(ready_engine(1).await);
    let (left, right) = small_pair();
    let fields: [(&str, &[u8]); 2] = [("left", &left), ("right", &right)];
    for query in [
        "max_uncertainty=-1",
        "max_uncertainty=0",
        "max_uncertainty=nan",
        "max_uncertainty=inf",
        "max_uncertainty=wide",
        "format=png16&ply_uncertainty=true",
        "format=ply&ply_uncertainty=maybe",
        "format=variance",
        "uncertainty=false&max_uncertainty=1",
        "format=png16&uncertainty=false",
        "uncertainty=no",
    ] {
        let reply = send(&app, multipart_request(&format!("/api/v1/disparity?{query}"), &fields)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.error_code(), "invalid_query", "{query}");
        let message = reply.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("uncertainty"), "{query}: the message should name the parameter: {message}");
    }
    let reply = send(&app, multipart_request("/api/v1/disparity?format=depth_uncertainty", &fields)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "calibration_required");
    // A JSON answer can leave the deviation out (and its cost).
    let reply = send(&app, multipart_request("/api/v1/disparity?uncertainty=false", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let plain = reply.json();
    assert!(plain.get("uncertainty").is_none() && plain["images"].get("uncertainty_png").is_none(), "{plain}");
    assert!(plain["images"]["color_png"].is_string());
    // The deviation alone needs no calibration.
    let reply = send(&app, multipart_request("/api/v1/disparity?format=uncertainty", &fields)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/x-portable-floatmap");
    let sigma = pfm::decode(&reply.body).unwrap();
    let size = image::load_from_memory(&left).unwrap();
    assert_eq!((sigma.width(), sigma.height()), (size.width(), size.height()));
}
