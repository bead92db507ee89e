//! `GET /api/v1/stream`: stereo video in, disparity out, over one WebSocket.
//!
//! The client sends an optional JSON settings message, then frames (two binary
//! messages per frame, left then right, or one packed side-by-side or top-bottom
//! image). Each frame the server processes is answered with a JSON text message
//! and the image in the asked format. The latest frame wins: while one frame runs
//! through the pipeline, a newer one replaces the one waiting, and the answer
//! says how many were skipped, so a slow device never builds a backlog and a
//! stream holds at most one frame in flight and one waiting.
//!
//! The handler checks the handshake, the origin and the stream cap, answers 101,
//! and the connection layer hands the socket over ([`ConnectionHandle::take_over`]).
//! Frames go through the same [`Pipeline`](crate::pipeline::Pipeline) as uploads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::error::ApiError;
use super::AppState;
use crate::calibration::{self, Calibration, CalibrationFormat};
use crate::decode::{DecodeError, VideoLayout};
use crate::disparity::DisparityStats;
use crate::engine::{EngineError, EngineStatus};
use crate::pipeline::{self, EncodedAnswer, Options, OutputFormat, PairInput, PipelineError, Timings};
use crate::server::{ConnectionHandle, TakenOver};

/// The subprotocol the server selects when a client offers it.
pub const SUBPROTOCOL: &str = "stereo-recon";
/// A client may offer its API key as the subprotocol `bearer.KEY` (browsers cannot set headers here).
pub const KEY_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// The open streams and their limits, shared by every connection.
#[derive(Clone)]
pub struct Streams {
    slots: Arc<Semaphore>,
    /// Streams open at once at most (`--max-streams`).
    pub max: usize,
    /// A stream that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    answered: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl Streams {
    pub fn new(max: usize, idle_timeout: Duration) -> Streams {
        Streams {
            slots: Arc::new(Semaphore::new(max)),
            max,
            idle_timeout,
            answered: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Frames answered and frames skipped (replaced by a newer one, or the queue full), since the start.
    pub fn frame_counts(&self) -> (u64, u64) {
        (self.answered.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }
}

/// Why the server closes a stream: each with its WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the server is shutting down, or the stream was idle.
    GoingAway,
    /// A frame that is not an image we read.
    NotAnImage,
    /// A settings message that is not valid JSON of the settings' form.
    BadSettings,
    /// A frame or setting over a limit (pixels, sizes that differ, a format without its calibration).
    Violation,
    /// A message over the size limit.
    TooBig,
    /// The engine failed; the detail is in the server log.
    ServerError,
}

impl CloseReason {
    /// Every reason, for the documentation and its test.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::GoingAway,
        CloseReason::NotAnImage,
        CloseReason::BadSettings,
        CloseReason::Violation,
        CloseReason::TooBig,
        CloseReason::ServerError,
    ];

    /// The close code sent (RFC 6455, section 7.4.1).
    pub fn code(self) -> u16 {
        match self {
            CloseReason::GoingAway => 1001,
            CloseReason::NotAnImage => 1003,
            CloseReason::BadSettings => 1007,
            CloseReason::Violation => 1008,
            CloseReason::TooBig => 1009,
            CloseReason::ServerError => 1011,
        }
    }

    /// What the code means here, for docs/stream.md.
    pub fn meaning(self) -> &'static str {
        match self {
            CloseReason::GoingAway => "the server shuts down, or nothing arrived for --stream-idle-timeout-secs",
            CloseReason::NotAnImage => "a frame that is not a PNG, JPEG, BMP, TIFF or WebP image",
            CloseReason::BadSettings => "a text message that is not valid settings JSON",
            CloseReason::Violation => {
                "a frame over the pixel limit, views of different sizes, or a format that needs a calibration without one"
            }
            CloseReason::TooBig => "a message over --max-upload-bytes",
            CloseReason::ServerError => "the inference failed (the detail is in the server log)",
        }
    }
}

/// The settings message, every field optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// What each answer's binary message holds: `color` (default), `png16`, `pfm`,
    /// `uncertainty`, or with a calibration `depth`, `depth16`, `depth_uncertainty`.
    #[serde(default)]
    pub format: Option<OutputFormat>,
    /// `pair` (default: two messages per frame), `sbs` or `tb` (one packed image).
    #[serde(default)]
    pub layout: Option<FrameLayout>,
    /// Pixels whose deviation is above this many pixels get no value; `null` turns it off.
    #[serde(default, deserialize_with = "present")]
    pub max_uncertainty: Option<Option<f32>>,
    /// The rig's calibration: a calibration file's text or our calibration object.
    #[serde(default)]
    pub calibration: Option<serde_json::Value>,
    /// Run the network on frames downscaled by this factor (0.25 to 1); answers come at
    /// the scaled size. What makes a CPU stream usable.
    #[serde(default)]
    pub scale: Option<f32>,
}

/// A field that is there, even as `null` (absent fields stay `None`: no change).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// How a frame's two views arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameLayout {
    /// Two binary messages: left, then right.
    Pair,
    Sbs,
    Tb,
}

/// The settings in force, checked.
#[derive(Clone)]
struct Current {
    format: OutputFormat,
    layout: FrameLayout,
    max_uncertainty: Option<f32>,
    calibration: Option<(Calibration, CalibrationFormat)>,
    scale: Option<f32>,
}

impl Default for Current {
    fn default() -> Self {
        Current {
            format: OutputFormat::Color,
            layout: FrameLayout::Pair,
            max_uncertainty: None,
            calibration: None,
            scale: None,
        }
    }
}

/// A settings message applied to the settings in force, or why it cannot be.
fn apply_settings(current: &Current, text: &str) -> Result<Current, (CloseReason, String)> {
    let bad = |message: String| (CloseReason::BadSettings, message);
    let settings: Settings = serde_json::from_str(text).map_err(|e| bad(format!("settings: {e}")))?;
    let mut next = current.clone();
    if let Some(format) = settings.format {
        if format == OutputFormat::Json || format == OutputFormat::Ply {
            return Err(bad(format!("format {}: a stream answers images, not {}", format.label(), format.label())));
        }
        next.format = format;
    }
    if let Some(layout) = settings.layout {
        next.layout = layout;
    }
    match settings.max_uncertainty {
        None => {}
        Some(None) => next.max_uncertainty = None,
        Some(Some(limit)) if limit.is_finite() && limit > 0.0 => next.max_uncertainty = Some(limit),
        Some(Some(limit)) => return Err(bad(format!("max_uncertainty {limit}: give a positive number of pixels"))),
    }
    if let Some(scale) = settings.scale {
        if let Some(problem) = pipeline::scale_problem(scale) {
            return Err(bad(problem));
        }
        next.scale = Some(scale);
    }
    match settings.calibration {
        None | Some(serde_json::Value::Null) => {}
        Some(value) => {
            let text = match value {
                serde_json::Value::String(text) => text,
                object @ serde_json::Value::Object(_) => object.to_string(),
                _ => return Err(bad("calibration: a calibration file's text or a calibration object".into())),
            };
            let parsed = calibration::parse(&text).map_err(|e| bad(format!("calibration: {e}")))?;
            next.calibration = Some(parsed);
        }
    }
    if next.format.needs_calibration() && next.calibration.is_none() {
        return Err((CloseReason::Violation, format!("format {} needs a calibration", next.format.label())));
    }
    Ok(next)
}

/// One frame, complete, waiting for the pipeline.
struct Frame {
    index: u64,
    pair: PairInput,
    settings: Current,
    received: Instant,
}

/// What the reader and the worker of one stream share.
struct Shared {
    state: Mutex<SlotState>,
    /// Wakes the worker: a frame is waiting, or the stream is to end.
    changed: Notify,
    /// Becomes true when the stream is to end (wakes the reader).
    ended: tokio::sync::watch::Sender<bool>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared { state: Mutex::default(), changed: Notify::new(), ended: tokio::sync::watch::Sender::new(false) }
    }
}

enum Step {
    End(Option<(CloseReason, String)>),
    /// A frame, and how many were skipped before it.
    Run(Box<Frame>, u64),
    Wait,
}

#[derive(Default)]
struct SlotState {
    waiting: Option<Frame>,
    /// Frames skipped since the last answer.
    dropped: u64,
    /// Set once the stream is to end, with the close to send (none: the client is gone).
    ending: Option<Option<(CloseReason, String)>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Latest frame wins: a frame still waiting is replaced and counted as dropped.
    fn offer(&self, frame: Frame, streams: &Streams) {
        let mut state = self.lock();
        if state.waiting.replace(frame).is_some() {
            state.dropped += 1;
            streams.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// What the worker does next: end the stream, run the waiting frame, or wait.
    fn next_step(&self) -> Step {
        let mut state = self.lock();
        if let Some(close) = state.ending.clone() {
            return Step::End(close);
        }
        match state.waiting.take() {
            Some(frame) => Step::Run(Box::new(frame), std::mem::take(&mut state.dropped)),
            None => Step::Wait,
        }
    }

    fn end(&self, close: Option<(CloseReason, String)>) {
        let mut state = self.lock();
        state.ending.get_or_insert(close);
        drop(state);
        self.ended.send_replace(true);
        self.changed.notify_one();
    }
}

/// Open a stereo video stream (WebSocket).
///
/// Upgrade to a WebSocket, then send an optional settings message
/// `{"format", "layout", "max_uncertainty", "scale", "calibration"}` and frames; see docs/stream.md.
/// Browsers may pass the API key as the subprotocol `bearer.KEY`.
#[utoipa::path(
    get,
    path = "/api/v1/stream",
    tag = "disparity",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; frames and answers follow (docs/stream.md)."),
        (status = 400, description = "`not_a_websocket`: the request is not a WebSocket handshake (version 13).", body = super::error::ErrorAnswer),
        (status = 401, description = "`unauthorized`: no API key, or a wrong one.", body = super::error::ErrorAnswer),
        (status = 403, description = "`cross_origin_forbidden`: a browser page of another origin.", body = super::error::ErrorAnswer),
        (status = 503, description = "`too_many_streams`, `model_loading` or `engine_unavailable`.", body = super::error::ErrorAnswer),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    connection: Option<Extension<ConnectionHandle>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let accept = handshake_accept(&headers)?;
    if !state.origins.admits(&headers) {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or_default();
        return Err(ApiError::CrossOrigin(super::error::echo(origin)));
    }
    match state.engine.status() {
        EngineStatus::Ready(_) => {}
        EngineStatus::Loading => return Err(EngineError::NotReady.into()),
        EngineStatus::Failed(_) => return Err(EngineError::Stopped.into()),
    }
    let Some(Extension(connection)) = connection else {
        return Err(ApiError::Internal("a stream needs a connection to take over".into()));
    };
    let permit = state
        .streams
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyStreams { limit: state.streams.max })?;
    let taken = connection.take_over();
    tokio::spawn(run_stream(state, taken, permit));
    Ok(switching_protocols(&accept, offers_subprotocol(&headers)))
}

/// The `Sec-WebSocket-Accept` value for a valid handshake, or why it is not one.
fn handshake_accept(headers: &HeaderMap) -> Result<String, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::NotAWebSocket("send a WebSocket handshake (Upgrade: websocket)".into()));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(ApiError::NotAWebSocket("only WebSocket version 13 is spoken here".into()));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::NotAWebSocket("the handshake has no Sec-WebSocket-Key".into()))?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The offered subprotocols, as listed in `Sec-WebSocket-Protocol`.
pub fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn offers_subprotocol(headers: &HeaderMap) -> bool {
    offered_subprotocols(headers).any(|p| p == SUBPROTOCOL)
}

fn switching_protocols(accept: &str, select_subprotocol: bool) -> Response {
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(accept).expect("base64 is a header value"));
    if select_subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    response
}

type Socket = WebSocketStream<crate::server::TimedStream>;

/// One stream from the handed-over socket to its close.
async fn run_stream(state: AppState, taken: tokio::sync::oneshot::Receiver<TakenOver>, _slot: OwnedSemaphorePermit) {
    // No socket: the client left before the 101 was sent.
    let Ok(taken) = taken.await else { return };
    let TakenOver { stream, read_ahead, mut stop, .. } = taken;
    let limit = state.limits.max_upload_bytes;
    let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
    let socket: Socket =
        WebSocketStream::from_partially_read(stream, read_ahead.to_vec(), Role::Server, Some(config)).await;
    let (mut sink, mut source) = socket.split();
    let shared = Arc::new(Shared::default());
    tracing::info!(open = state.streams.open(), "stream opened");
    let reader = read_frames(&state, &mut source, &shared, &mut stop);
    let worker = answer_frames(&state, &mut sink, &shared);
    tokio::join!(reader, worker);
    tracing::info!("stream closed");
}

/// Reads messages into frames until the stream ends, the client goes quiet, or the server stops.
async fn read_frames(
    state: &AppState,
    source: &mut futures_util::stream::SplitStream<Socket>,
    shared: &Shared,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    let mut settings = Current::default();
    let mut pending_left: Option<Bytes> = None;
    let mut next_index = 0u64;
    let idle = state.streams.idle_timeout;
    let mut ended = shared.ended.subscribe();
    loop {
        let message = tokio::select! {
            message = tokio::time::timeout(idle, source.next()) => message,
            _ = stop.wait_for(|s| *s) => {
                return shared.end(Some((CloseReason::GoingAway, "the server is shutting down".into())));
            }
            _ = ended.wait_for(|e| *e) => return,
        };
        let message = match message {
            Err(_) => {
                let reason = format!("nothing arrived for {} s", idle.as_secs());
                return shared.end(Some((CloseReason::GoingAway, reason)));
            }
            Ok(None) | Ok(Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) => return shared.end(None),
            Ok(Some(Err(WsError::Capacity(e)))) => {
                return shared.end(Some((
                    CloseReason::TooBig,
                    format!("{e} (the limit is {} bytes)", state.limits.max_upload_bytes),
                )));
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "stream read failed");
                return shared.end(None);
            }
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => match apply_settings(&settings, text.as_str()) {
                Ok(next) => {
                    // A half-sent pair is dropped with the settings it was sent under.
                    pending_left = None;
                    settings = next;
                }
                Err(close) => return shared.end(Some(close)),
            },
            Message::Binary(bytes) => {
                if let Err(close) = check_frame_header(&bytes, settings.layout, state.limits.max_pixels) {
                    return shared.end(Some(close));
                }
                let pair = match (settings.layout, pending_left.take()) {
                    (FrameLayout::Pair, None) => {
                        pending_left = Some(bytes);
                        continue;
                    }
                    (FrameLayout::Pair, Some(left)) => PairInput::Files { left, right: bytes },
                    (FrameLayout::Sbs, _) => PairInput::Packed { image: bytes, layout: VideoLayout::Sbs },
                    (FrameLayout::Tb, _) => PairInput::Packed { image: bytes, layout: VideoLayout::Tb },
                };
                let frame = Frame { index: next_index, pair, settings: settings.clone(), received: Instant::now() };
                next_index += 1;
                shared.offer(frame, &state.streams);
            }
            Message::Close(_) => return shared.end(None),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// The cheap checks of a frame message, from its header alone, so a bad one closes
/// the stream at once even when it would have been skipped.
fn check_frame_header(bytes: &[u8], layout: FrameLayout, max_pixels: u64) -> Result<(), (CloseReason, String)> {
    let limit = if layout == FrameLayout::Pair { max_pixels } else { max_pixels.saturating_mul(2) };
    crate::decode::probe(bytes, limit).map(|_| ()).map_err(|e| {
        let field = if layout == FrameLayout::Pair { "image" } else { "frame" };
        (close_for_decode(&e), format!("the {field}: {e}"))
    })
}

fn close_for_decode(e: &DecodeError) -> CloseReason {
    match e {
        DecodeError::TooManyPixels { .. } => CloseReason::Violation,
        DecodeError::Empty
        | DecodeError::UnknownFormat
        | DecodeError::UnsupportedFormat(_)
        | DecodeError::Corrupt(_) => CloseReason::NotAnImage,
    }
}

/// What ends a stream when the pipeline fails on a frame (`None`: skip the frame).
fn close_for_pipeline(e: &PipelineError) -> Option<CloseReason> {
    match e {
        PipelineError::Engine(EngineError::QueueFull { .. }) | PipelineError::BudgetFull { .. } => None,
        PipelineError::Image { source, .. } => Some(close_for_decode(source)),
        PipelineError::SizeMismatch(_)
        | PipelineError::PaddedTooLarge { .. }
        | PipelineError::Calibration(_)
        | PipelineError::CalibrationRequired(_)
        | PipelineError::InvalidGroundTruth(_)
        | PipelineError::GroundTruthSizeMismatch { .. }
        | PipelineError::GroundTruthNeedsRectifiedPair
        | PipelineError::InvalidScale(_)
        | PipelineError::ScaleWithGroundTruth => Some(CloseReason::Violation),
        PipelineError::Engine(EngineError::NotReady | EngineError::Stopped | EngineError::Load(_)) => {
            Some(CloseReason::GoingAway)
        }
        PipelineError::Engine(EngineError::OutOfMemory(_) | EngineError::Inference(_)) | PipelineError::Internal(_) => {
            Some(CloseReason::ServerError)
        }
    }
}

/// The text message before each answer's image.
#[derive(Debug, Serialize)]
struct FrameAnswer {
    frame: u64,
    width: u32,
    height: u32,
    format: &'static str,
    /// With `scale` below 1: the answer is at the scaled size, in its pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<f32>,
    disparity: DisparityStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    uncertainty: Option<FrameUncertainty>,
    timings_ms: Timings,
    dropped: u64,
}

/// The deviation's figures, when the frame's settings computed it.
#[derive(Debug, Serialize)]
struct FrameUncertainty {
    #[serde(flatten)]
    stats: crate::uncertainty::UncertaintyStats,
    /// Pixels given no value by `max_uncertainty`.
    #[serde(skip_serializing_if = "Option::is_none")]
    masked_pixels: Option<u64>,
}

/// Runs the waiting frame through the pipeline and sends its answer, until the stream ends.
async fn answer_frames(state: &AppState, sink: &mut futures_util::stream::SplitSink<Socket, Message>, shared: &Shared) {
    let pipeline = state.pipeline();
    loop {
        let (frame, dropped) = loop {
            let notified = shared.changed.notified();
            match shared.next_step() {
                Step::End(close) => return send_close(sink, close).await,
                Step::Run(frame, dropped) => break (frame, dropped),
                Step::Wait => notified.await,
            }
        };
        let (index, format, settings) = (frame.index, frame.settings.format, frame.settings.clone());
        let request = pipeline::Request {
            pair: frame.pair,
            ground_truth: None,
            calibration: settings.calibration,
            options: Options {
                formats: vec![format],
                max_uncertainty: settings.max_uncertainty,
                scale: settings.scale,
                ..Options::default()
            },
            started: frame.received,
            receiving: None,
        };
        let outcome = match pipeline.run(request).await {
            Ok(outcome) => outcome,
            Err(e) => match close_for_pipeline(&e) {
                None => {
                    // The queue is full: this frame is skipped like a replaced one.
                    shared.lock().dropped += dropped + 1;
                    state.streams.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(reason) => {
                    if reason == CloseReason::ServerError {
                        tracing::error!(error = %e, "stream frame failed");
                    }
                    let message =
                        if reason == CloseReason::ServerError { "inference failed".into() } else { e.to_string() };
                    shared.end(Some((reason, message)));
                    continue;
                }
            },
        };
        let Some(answer) = outcome.answer(format) else { continue };
        let image = match &answer.body {
            EncodedAnswer::File { bytes, .. } => bytes.clone(),
            EncodedAnswer::Document(bytes) => bytes.clone(),
            EncodedAnswer::Json { .. } => continue,
        };
        let text = FrameAnswer {
            frame: index,
            width: outcome.disparity.width(),
            height: outcome.disparity.height(),
            format: format.label(),
            scale: outcome.scale,
            disparity: answer.stats,
            uncertainty: outcome.uncertainty.as_ref().map(|sigma| FrameUncertainty {
                stats: crate::uncertainty::stats(sigma),
                masked_pixels: answer.masked_pixels,
            }),
            timings_ms: outcome.timings,
            dropped,
        };
        let text = serde_json::to_string(&text).expect("the answer serialises");
        state.metrics.observe_phases(&outcome.timings);
        state.streams.answered.fetch_add(1, Ordering::Relaxed);
        let sent = async {
            sink.feed(Message::text(text)).await?;
            sink.send(Message::binary(image)).await
        };
        if sent.await.is_err() {
            return shared.end(None);
        }
    }
}

/// Ends the stream: a close frame with its code and reason when there is one to send.
async fn send_close(sink: &mut futures_util::stream::SplitSink<Socket, Message>, close: Option<(CloseReason, String)>) {
    if let Some((reason, message)) = close {
        tracing::debug!(code = reason.code(), %message, "closing stream");
        let frame = CloseFrame { code: CloseCode::from(reason.code()), reason: close_text(&message).into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
    }
    let _ = sink.close().await;
}

/// A close frame's reason holds at most 123 bytes: cut at a character boundary.
fn close_text(message: &str) -> String {
    let mut end = message.len().min(123);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_messages_change_only_what_they_name() {
        let base = Current::default();
        let next = apply_settings(&base, r#"{"format": "png16", "layout": "sbs"}"#).unwrap();
        assert_eq!((next.format, next.layout, next.max_uncertainty), (OutputFormat::Png16, FrameLayout::Sbs, None));
        let next = apply_settings(&next, r#"{"max_uncertainty": 2.5}"#).unwrap();
        assert_eq!((next.format, next.max_uncertainty), (OutputFormat::Png16, Some(2.5)));
        assert_eq!(apply_settings(&next, r#"{"layout": "tb"}"#).unwrap().max_uncertainty, Some(2.5));
        assert_eq!(apply_settings(&next, r#"{"max_uncertainty": null}"#).unwrap().max_uncertainty, None);
        assert_eq!(apply_settings(&base, r#"{"scale": 0.5}"#).unwrap().scale, Some(0.5));
        for bad in [
            r#"{"scale": 0.1}"#,
            r#"{"format": "gif"}"#,
            r#"{"speed": 2}"#,
            "not json",
            r#"{"max_uncertainty": -1}"#,
            r#"{"format": "json"}"#,
        ] {
            assert_eq!(apply_settings(&base, bad).err().map(|e| e.0), Some(CloseReason::BadSettings), "{bad}");
        }
        let needs = apply_settings(&base, r#"{"format": "depth"}"#).err().unwrap();
        assert_eq!(needs.0, CloseReason::Violation);
    }

    #[test]
    fn every_close_reason_has_its_own_code() {
        let mut codes: Vec<u16> = CloseReason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), CloseReason::ALL.len());
        assert!(CloseReason::ALL.iter().all(|r| !r.meaning().is_empty()));
        assert_eq!(close_text(&"é".repeat(100)).len(), 122, "cut at a character boundary");
    }

    #[test]
    fn the_documentation_lists_every_close_code_with_its_meaning() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/stream.md")).unwrap();
        for reason in CloseReason::ALL {
            let row = format!("| {} | {} |", reason.code(), reason.meaning());
            assert!(doc.contains(&row), "docs/stream.md lacks the row {row}");
        }
    }
}
