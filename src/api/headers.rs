//! The headers our answers carry besides the standard ones: one table, from
//! which the handlers take their names and the CORS expose list is written,
//! so a page of another origin can read every one of them.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::pipeline::{Answer, Timings};

/// Each phase's duration (decode, queue, inference, encode, total), ms.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
pub const DISPARITY_MIN: HeaderName = HeaderName::from_static("x-disparity-min");
pub const DISPARITY_MAX: HeaderName = HeaderName::from_static("x-disparity-max");
pub const DISPARITY_MEAN: HeaderName = HeaderName::from_static("x-disparity-mean");
/// Where the network ran (`cpu`, `cuda:0`).
pub const DEVICE: HeaderName = HeaderName::from_static("x-device");
/// Units of a depth or point answer (the calibration's).
pub const DEPTH_UNITS: HeaderName = HeaderName::from_static("x-depth-units");
pub const EVAL_EPE: HeaderName = HeaderName::from_static("x-eval-epe");
pub const EVAL_D1: HeaderName = HeaderName::from_static("x-eval-d1");
/// Pixels `max_uncertainty` gave no value.
pub const MASKED_PIXELS: HeaderName = HeaderName::from_static("x-masked-pixels");

/// With `scale` below 1: the factor the pair was downscaled by (the file is at that size).
pub const SCALE: HeaderName = HeaderName::from_static("x-scale");

/// Every header of ours a browser page may read, in the CORS expose list.
pub const EXPOSED: [HeaderName; 11] = [
    SERVER_TIMING,
    header::RETRY_AFTER,
    DISPARITY_MIN,
    DISPARITY_MAX,
    DISPARITY_MEAN,
    DEVICE,
    DEPTH_UNITS,
    EVAL_EPE,
    EVAL_D1,
    MASKED_PIXELS,
    SCALE,
];

/// `Access-Control-Expose-Headers`: the names of [`EXPOSED`].
pub fn expose_list() -> HeaderValue {
    let exposed = EXPOSED;
    let names: Vec<&str> = exposed.iter().map(HeaderName::as_str).collect();
    HeaderValue::from_str(&names.join(", ")).expect("header names are ASCII")
}

/// `Server-Timing` for `timings`.
pub fn server_timing(timings: &Timings) -> HeaderValue {
    HeaderValue::from_str(&timings.server_timing()).expect("ascii")
}

/// The figures a file answer carries in headers (a JSON answer has them in its body).
pub fn file_figures(headers: &mut HeaderMap, answer: &Answer, device: &str) {
    let number = |value: String| HeaderValue::from_str(&value).expect("a number is ASCII");
    let stats = &answer.stats;
    for (name, value) in [(DISPARITY_MIN, stats.min), (DISPARITY_MAX, stats.max), (DISPARITY_MEAN, stats.mean)] {
        headers.insert(name, number(value.to_string()));
    }
    headers.insert(DEVICE, HeaderValue::from_str(device).unwrap_or(HeaderValue::from_static("unknown")));
    if let Some(count) = answer.masked_pixels {
        headers.insert(MASKED_PIXELS, HeaderValue::from(count));
    }
    if let Some(units) = answer.depth_units {
        headers.insert(DEPTH_UNITS, HeaderValue::from_static(units));
    }
    if let Some(m) = answer.evaluation {
        headers.insert(EVAL_EPE, number(format!("{:.4}", m.epe)));
        headers.insert(EVAL_D1, number(format!("{:.4}", m.d1)));
    }
}
