//! `GET /metrics`: what the server is doing, in the Prometheus text exposition
//! format (version 0.0.4), written by the `prometheus` crate.
//!
//! Two kinds of series:
//! - observed per request by the [`track`] middleware (requests, durations,
//!   phases, rejections), from the answer's status, its route, its error code
//!   and the phase timings the disparity handler attaches;
//! - read at scrape time from counters that already exist as atomics (the
//!   engine's queue and outcomes, the upload budget, the connection layer, the
//!   CUDA allocator figures the engine thread publishes after each job). So a
//!   scrape never sends anything to the engine thread or waits on it.
//!
//! Durations are in seconds (Prometheus' base unit), with buckets from 1 ms to
//! 2 min, which resolve both a 10 ms GPU inference and a 10 s CPU one.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::error::ErrorBody;
use super::AppState;
use crate::pipeline::{OutputFormat, Timings};

/// Prometheus' content type for the text format we write.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds (seconds) of every duration histogram.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    phase_duration: HistogramVec,
    rejected: IntCounterVec,
    queue_in_flight: IntGauge,
    queue_capacity: IntGauge,
    inferences: IntCounterVec,
    model_info: IntGaugeVec,
    upload_bytes_in_flight: IntGauge,
    upload_budget_bytes: IntGauge,
    connections_open: IntGauge,
    connections: IntCounterVec,
    streams_open: IntGauge,
    stream_frames: IntCounterVec,
    /// Registered only once the model runs on CUDA (a CPU server has no such memory).
    cuda: Registry,
    cuda_allocated: IntGauge,
    cuda_peak: IntGauge,
    /// Registered only while the CPU buffer pool is in place.
    buffer_pool: Registry,
    buffer_pool_held: IntGauge,
    buffer_pool_in_use: IntGauge,
    /// Scrapes bring the counters read from atomics up to date one at a time.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry.register(Box::new(metric.clone())).expect("unique metric name");
    metric
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("valid histogram");
    registry.register(Box::new(metric.clone())).expect("unique metric name");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid gauge");
    registry.register(Box::new(metric.clone())).expect("unique metric name");
    metric
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let cuda = Registry::new();
        let buffer_pool = Registry::new();
        Metrics {
            requests: counter_vec(
                &r,
                "stereo_recon_requests_total",
                "HTTP requests answered, by route, answer format (disparity route only) and status code.",
                &["route", "format", "status"],
            ),
            request_duration: histogram_vec(
                &r,
                "stereo_recon_request_duration_seconds",
                "Time from the request's arrival to its answer's head (the body may stream after), by route.",
                &["route"],
            ),
            phase_duration: histogram_vec(
                &r,
                "stereo_recon_phase_duration_seconds",
                "Time of each phase of a served disparity request or stream frame: decode, queue, inference, encode.",
                &["phase"],
            ),
            rejected: counter_vec(
                &r,
                "stereo_recon_rejected_total",
                "Requests refused or cut short, by reason: the JSON error code of a 4xx or 503 answer, or too_many_connections, connection_timeout and malformed_request (a request head too long or malformed to parse) from the connection layer.",
                &["reason"],
            ),
            queue_in_flight: gauge(
                &r,
                "stereo_recon_queue_in_flight",
                "Requests holding a place in the inference queue now (running or waiting).",
            ),
            queue_capacity: gauge(
                &r,
                "stereo_recon_queue_capacity",
                "Places in the inference queue: the running job plus --queue-depth waiting.",
            ),
            inferences: counter_vec(
                &r,
                "stereo_recon_inferences_total",
                "Jobs the engine thread finished, by outcome: completed, failed, or abandoned (client gone before it ran).",
                &["outcome"],
            ),
            model_info: {
                let metric = IntGaugeVec::new(
                    Opts::new("stereo_recon_model_info", "The loaded model (always 1), with what it runs on in labels."),
                    &["model", "device", "precision", "libtorch"],
                )
                .expect("valid gauge");
                r.register(Box::new(metric.clone())).expect("unique metric name");
                metric
            },
            upload_bytes_in_flight: gauge(
                &r,
                "stereo_recon_upload_bytes_in_flight",
                "Bytes of the upload budget taken by requests being received and decoded.",
            ),
            upload_budget_bytes: gauge(
                &r,
                "stereo_recon_upload_budget_bytes",
                "The upload budget (--max-inflight-bytes).",
            ),
            connections_open: gauge(&r, "stereo_recon_connections_open", "TCP connections open now."),
            connections: counter_vec(
                &r,
                "stereo_recon_connections_total",
                "Connection-layer events: accepted, evicted (idle one closed for a newcomer at the cap), refused (503 at the cap), timed_out, lingered (closed after an early answer).",
                &["event"],
            ),
            streams_open: gauge(&r, "stereo_recon_streams_open", "WebSocket streams (/api/v1/stream) open now."),
            stream_frames: counter_vec(
                &r,
                "stereo_recon_stream_frames_total",
                "Frames of WebSocket streams, by outcome: answered, or dropped (a newer frame replaced it, or the queue was full).",
                &["outcome"],
            ),
            cuda_allocated: gauge(
                &cuda,
                "stereo_recon_cuda_allocated_bytes",
                "Bytes the CUDA caching allocator has given to tensors, after the last job.",
            ),
            cuda_peak: gauge(
                &cuda,
                "stereo_recon_cuda_allocated_peak_bytes",
                "Most bytes the CUDA caching allocator had given to tensors at once since the start.",
            ),
            buffer_pool_held: gauge(
                &buffer_pool,
                "stereo_recon_buffer_pool_bytes",
                "Memory the CPU buffer pool holds for large tensors (in use or free for the next pass).",
            ),
            buffer_pool_in_use: gauge(
                &buffer_pool,
                "stereo_recon_buffer_pool_in_use_bytes",
                "Bytes of the CPU buffer pool held by live tensors now.",
            ),
            registry: r,
            cuda,
            buffer_pool,
            scrape: Mutex::new(()),
        }
    }

    /// Records one answered request.
    pub fn observe(&self, answer: &AnswerSummary<'_>) {
        let status = answer.status.to_string();
        self.requests.with_label_values(&[answer.route, answer.format, &status]).inc();
        self.request_duration.with_label_values(&[answer.route]).observe(answer.elapsed.as_secs_f64());
        if let Some(t) = answer.timings {
            self.observe_phases(t);
        }
        if answer.status == 503 || (400..500).contains(&answer.status) {
            if let Some(code) = answer.error_code {
                self.rejected.with_label_values(&[code]).inc();
            }
        }
    }

    /// Records the phases of one pair's pass through the pipeline (a request or a stream's frame).
    pub fn observe_phases(&self, t: &Timings) {
        for (phase, ms) in
            [("decode", t.decode_ms), ("queue", t.queue_ms), ("inference", t.inference_ms), ("encode", t.encode_ms)]
        {
            self.phase_duration.with_label_values(&[phase]).observe(ms / 1000.0);
        }
    }

    /// The exposition text, with the scrape-time series brought up to date.
    pub fn render(&self, state: &AppState) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let engine = state.engine.stats();
        self.queue_in_flight.set(engine.in_flight as i64);
        self.queue_capacity.set(engine.capacity as i64);
        for (outcome, total) in
            [("completed", engine.completed), ("failed", engine.failed), ("abandoned", engine.abandoned)]
        {
            catch_up(&self.inferences.with_label_values(&[outcome]), total);
        }
        if let Some(info) = state.model_info() {
            self.model_info.reset();
            self.model_info
                .with_label_values(&[&info.name, &info.device, &info.precision, &info.libtorch_version])
                .set(1);
        }
        self.upload_bytes_in_flight.set(state.uploads.in_use_bytes() as i64);
        self.upload_budget_bytes.set(state.uploads.total_bytes() as i64);
        let c = &state.connection_stats;
        self.connections_open.set(c.open.load(Ordering::Relaxed) as i64);
        for (event, counter) in [
            ("accepted", &c.accepted),
            ("evicted", &c.evicted),
            ("refused", &c.refused),
            ("timed_out", &c.timed_out),
            ("lingered", &c.lingered),
        ] {
            catch_up(&self.connections.with_label_values(&[event]), counter.load(Ordering::Relaxed));
        }
        catch_up(&self.rejected.with_label_values(&["too_many_connections"]), c.refused.load(Ordering::Relaxed));
        catch_up(&self.rejected.with_label_values(&["connection_timeout"]), c.timed_out.load(Ordering::Relaxed));
        catch_up(&self.rejected.with_label_values(&["malformed_request"]), c.malformed.load(Ordering::Relaxed));

        self.streams_open.set(state.streams.open() as i64);
        let (answered, dropped) = state.streams.frame_counts();
        catch_up(&self.stream_frames.with_label_values(&["answered"]), answered);
        catch_up(&self.stream_frames.with_label_values(&["dropped"]), dropped);

        let mut families = self.registry.gather();
        if let Some(memory) = state.engine.cuda_memory() {
            self.cuda_allocated.set(memory.allocated_bytes as i64);
            self.cuda_peak.set(memory.peak_allocated_bytes as i64);
            families.extend(self.cuda.gather());
        }
        if let Some(pool) = crate::engine::buffer_pool::stats() {
            self.buffer_pool_held.set(pool.extent_bytes as i64);
            self.buffer_pool_in_use.set(pool.in_use_bytes as i64);
            families.extend(self.buffer_pool.gather());
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&families, &mut text).expect("text encoding of valid families");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}

/// Raises `counter` to `total`, a monotonic count kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    let behind = total.saturating_sub(counter.get());
    if behind > 0 {
        counter.inc_by(behind);
    }
}

/// What [`Metrics::observe`] records of one answer.
pub struct AnswerSummary<'a> {
    pub route: &'a str,
    pub format: &'a str,
    pub status: u16,
    pub elapsed: Duration,
    pub timings: Option<&'a Timings>,
    pub error_code: Option<&'a str>,
}

/// The route template an answer came from, copied from the router's
/// [`MatchedPath`] by [`mark_route`] (unmatched requests have none).
#[derive(Debug, Clone)]
struct RouteLabel(String);

/// Route layer: remembers the matched route on the answer for [`track`].
pub async fn mark_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|m| route_label(m.as_str()));
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteLabel(route));
    }
    response
}

/// The file trees, each one route whatever the file.
const FILE_TREES: [&str; 3] = ["/static", "/data", "/docs"];

/// File trees are one route each, whatever the file.
fn route_label(matched: &str) -> String {
    file_tree(matched).map_or_else(|| matched.to_owned(), str::to_owned)
}

/// The file tree a path lies in, if any (`/static/app.js` -> `/static`). The
/// nested file services have no matched route of their own, so their
/// answers are labelled from the path.
fn file_tree(path: &str) -> Option<&'static str> {
    FILE_TREES
        .into_iter()
        .find(|tree| path.strip_prefix(tree).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
}

/// The `format` label: the disparity route's answer format, bounded to the
/// known ones ([`OutputFormat::ALL`]; anything else is `invalid`), so clients
/// cannot grow the number of series.
fn format_label(route: &str, query: Option<&str>) -> &'static str {
    if route != "/api/v1/disparity" {
        return "none";
    }
    let asked = query.unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("format="));
    match asked {
        None => "json",
        Some(value) => OutputFormat::from_label(value).map_or("invalid", OutputFormat::label),
    }
}

/// Middleware (just inside the request ID): records every answer.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let query = request.uri().query().map(str::to_owned);
    let tree = file_tree(request.uri().path());
    let response = next.run(request).await;
    let route = response.extensions().get::<RouteLabel>().map(|r| r.0.as_str()).or(tree).unwrap_or("unmatched");
    state.metrics.observe(&AnswerSummary {
        route,
        format: format_label(route, query.as_deref()),
        status: response.status().as_u16(),
        elapsed: started.elapsed(),
        timings: response.extensions().get::<Timings>(),
        error_code: response.extensions().get::<ErrorBody>().map(|e| e.code.as_str()),
    });
    response
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Every series; see docs/metrics.md.", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state);
    ([(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_labels_are_bounded() {
        assert_eq!(format_label("/api/v1/disparity", None), "json");
        assert_eq!(format_label("/api/v1/disparity", Some("format=pfm&include_pfm=true")), "pfm");
        assert_eq!(format_label("/api/v1/disparity", Some("gt_scale=2&format=ply")), "ply");
        assert_eq!(format_label("/api/v1/disparity", Some("format=%00evil")), "invalid");
        assert_eq!(format_label("/api/v1/health", Some("format=pfm")), "none");
        for format in OutputFormat::ALL {
            let query = format!("format={}", format.label());
            assert_eq!(format_label("/api/v1/disparity", Some(&query)), format.label());
        }
    }

    #[test]
    fn file_trees_are_one_route() {
        assert_eq!(route_label("/static/{*__private__axum_nest_tail_param}"), "/static");
        assert_eq!(route_label("/api/v1/health"), "/api/v1/health");
        assert_eq!(file_tree("/data/synthetic/left.png"), Some("/data"));
        assert_eq!(file_tree("/static"), Some("/static"));
        assert_eq!(file_tree("/database"), None);
    }

    #[test]
    fn observed_requests_show_in_the_exposition() {
        let metrics = Metrics::new();
        let timings = Timings { decode_ms: 5.0, queue_ms: 0.0, inference_ms: 41.0, encode_ms: 3.0, total_ms: 50.0 };
        metrics.observe(&AnswerSummary {
            route: "/api/v1/disparity",
            format: "png16",
            status: 200,
            elapsed: Duration::from_millis(50),
            timings: Some(&timings),
            error_code: None,
        });
        metrics.observe(&AnswerSummary {
            route: "/api/v1/disparity",
            format: "json",
            status: 503,
            elapsed: Duration::from_millis(1),
            timings: None,
            error_code: Some("queue_full"),
        });
        let mut text = Vec::new();
        TextEncoder::new().encode(&metrics.registry.gather(), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains(r#"stereo_recon_requests_total{format="png16",route="/api/v1/disparity",status="200"} 1"#)
        );
        assert!(text.contains(r#"stereo_recon_rejected_total{reason="queue_full"} 1"#));
        assert!(text.contains(r#"stereo_recon_phase_duration_seconds_bucket{phase="inference",le="0.05"} 1"#));
        assert!(text.contains(r#"stereo_recon_phase_duration_seconds_bucket{phase="inference",le="0.035"} 0"#));
        assert!(text.contains(r#"stereo_recon_request_duration_seconds_count{route="/api/v1/disparity"} 2"#));
    }
}
