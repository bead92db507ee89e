// The page's video mode: frames of a local stereo video (or of two cameras) go
// to GET /api/v1/stream over a WebSocket; each answer is drawn as it arrives.
// The server keeps only the newest waiting frame, so the view keeps up with
// the video whatever the device's speed; here a frame is also skipped while
// the socket still holds an unsent one, so a slow link never queues frames.

import { $, showError, hideError } from "./dom.js";
import { apiFetch, storedKey } from "./api.js";
import { turbo } from "./colormap.js";
import { parsePfm } from "./pfm.js";

const stream = {
  ws: null,
  open: false,
  info: null, // the text message of the answer whose image comes next
  sentAt: new Map(), // frame number -> when it was sent
  sent: 0,
  answered: 0,
  dropped: 0, // skipped by the server (a newer frame came) or here (the socket was busy)
  answerTimes: [],
  latency: 0,
  recorder: null,
  last: null, // the latest answer's text message
  calibration: null, // the rig's calibration file, as text (any format the server reads)
};

// For tests and curious users: what the stream has done so far.
window.stereoVideo = {
  stats: () => ({ sent: stream.sent, answered: stream.answered, dropped: stream.dropped }),
  last: () => stream.last,
};

const grab = document.createElement("canvas");
const grabRight = document.createElement("canvas");

function layout() {
  return $("video-layout").value;
}

function settings() {
  const sigma = Number($("video-sigma").value);
  const off = sigma >= Number($("video-sigma").max);
  return {
    format: $("video-format").value,
    layout: layout(),
    max_uncertainty: off ? null : sigma / 4,
    scale: Number($("video-scale").value),
    ...(stream.calibration ? { calibration: stream.calibration } : {}),
  };
}

// The scale whose frames should take about a second here, from how long the last one took:
// the network's time goes with the number of pixels, so with the square of the scale.
function scaleThatKeepsUp(inferenceMs, scale) {
  const wanted = scale * Math.sqrt(1000 / Math.max(inferenceMs, 1));
  const offered = [...$("video-scale").options].map((o) => Number(o.value));
  return offered.find((s) => s <= wanted) ?? offered[offered.length - 1];
}

function proposeScale(info) {
  const scale = info.scale ?? 1;
  const proposed = scaleThatKeepsUp(info.timings_ms.inference_ms, scale);
  $("video-scale-hint").textContent =
    proposed < scale ? `a frame takes ${(info.timings_ms.inference_ms / 1000).toFixed(1)} s here: scale ${proposed} keeps up better` : "";
}

function sendSettings() {
  const sigma = Number($("video-sigma").value);
  $("video-sigma-value").textContent = sigma >= Number($("video-sigma").max) ? "off" : `${(sigma / 4).toFixed(2)} px`;
  if (stream.open) stream.ws.send(JSON.stringify(settings()));
}

// Encodes what `video` shows now as a JPEG blob (a lossless PNG costs more to make than to send).
function snapshot(video, canvas) {
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.95));
}

async function sendFrame() {
  const left = $("video-left");
  if (!stream.open || left.readyState < 2 || !left.videoWidth) return;
  if (stream.ws.bufferedAmount > 0) {
    stream.dropped += 1; // the previous frame is still on its way: skip this one
    return;
  }
  const parts = [await snapshot(left, grab)];
  if (layout() === "pair") parts.push(await snapshot($("video-right"), grabRight));
  for (const part of parts) stream.ws.send(await part.arrayBuffer());
  stream.sentAt.set(stream.sent, performance.now());
  stream.sent += 1;
}

// Sends a frame on every new video frame while playing.
function onVideoFrame() {
  const left = $("video-left");
  if (left.paused) return;
  sendFrame();
  if (left.requestVideoFrameCallback) left.requestVideoFrameCallback(onVideoFrame);
  else setTimeout(onVideoFrame, 1000 / 30);
}

async function draw(info, data) {
  const canvas = $("video-output");
  const ctx = canvas.getContext("2d");
  if (info.format === "color") {
    const bitmap = await createImageBitmap(new Blob([data], { type: "image/png" }));
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    ctx.drawImage(bitmap, 0, 0);
    return;
  }
  const map = parsePfm(new Uint8Array(data));
  if (info.format === "depth") return drawDepth(ctx, canvas, map);
  // The deviation (PFM): turbo from 0 to twice its 90th percentile; hidden or unknown pixels black.
  const top = Math.max(0.5, 2 * (info.uncertainty ? info.uncertainty.p90 : 1));
  canvas.width = map.width;
  canvas.height = map.height;
  const image = ctx.createImageData(map.width, map.height);
  map.values.forEach((v, i) => image.data.set(Number.isFinite(v) ? [...turbo(v / top), 255] : [0, 0, 0, 255], 4 * i));
  ctx.putImageData(image, 0, 0);
}

// Depth (PFM, the calibration's units): turbo from near (red) to far (blue) over the 2nd to
// 98th percentile of the frame's depths; no depth black.
function drawDepth(ctx, canvas, map) {
  const finite = map.values.filter(Number.isFinite).sort();
  const near = finite.length ? finite[Math.floor(finite.length * 0.02)] : 0;
  const far = finite.length ? finite[Math.floor(finite.length * 0.98)] : 1;
  canvas.width = map.width;
  canvas.height = map.height;
  const image = ctx.createImageData(map.width, map.height);
  map.values.forEach((v, i) => {
    const t = 1 - (v - near) / Math.max(far - near, 1e-9);
    image.data.set(Number.isFinite(v) ? [...turbo(t), 255] : [0, 0, 0, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
}

const CAPTIONS = {
  color: "Disparity (turbo colours: near red, far blue; black: hidden)",
  uncertainty: "Uncertainty (blue sure, red unsure)",
  depth: "Depth (near red, far blue; black: no depth)",
};

async function useCalibration(file) {
  stream.calibration = await file.text();
  $("video-format-depth").disabled = false;
  $("video-format-depth").textContent = "depth";
  sendSettings();
}

function onAnswer(info, data) {
  const now = performance.now();
  stream.answered += 1;
  stream.dropped += info.dropped;
  const sentAt = stream.sentAt.get(info.frame);
  for (const frame of stream.sentAt.keys()) if (frame <= info.frame) stream.sentAt.delete(frame);
  if (sentAt !== undefined) stream.latency = now - sentAt;
  stream.answerTimes = stream.answerTimes.filter((t) => now - t < 5000).concat(now);
  const span = (now - stream.answerTimes[0]) / 1000;
  const rate = stream.answerTimes.length > 1 && span > 0 ? (stream.answerTimes.length - 1) / span : 0;
  $("video-stats").textContent =
    `frame ${info.frame} · ${rate.toFixed(1)} frames/s · latency ${Math.round(stream.latency)} ms · ` +
    `inference ${Math.round(info.timings_ms.inference_ms)} ms · dropped ${stream.dropped} of ${stream.sent} sent · ` +
    `disparity ${info.disparity.min.toFixed(1)}–${info.disparity.max.toFixed(1)} px`;
  stream.last = info;
  proposeScale(info);
  $("video-output-caption").textContent = CAPTIONS[info.format] || info.format;
  draw(info, data);
}

async function connect() {
  if (stream.ws && stream.ws.readyState <= WebSocket.OPEN) return;
  // A call that needs the key first: on a server with keys, the page asks for it once.
  const model = await apiFetch("/api/v1/model");
  if (!model.ok) {
    showError("The server refused the stream: it needs an API key this page does not have.");
    return;
  }
  const key = storedKey();
  const protocols = ["stereo-recon"].concat(key ? [`bearer.${key}`] : []);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/api/v1/stream`, protocols);
  ws.binaryType = "arraybuffer";
  stream.ws = ws;
  await new Promise((resolve) => {
    ws.onopen = () => {
      stream.open = true;
      ws.send(JSON.stringify(settings()));
      resolve();
    };
    ws.onerror = () => resolve();
  });
  ws.onmessage = (event) => {
    if (typeof event.data === "string") stream.info = JSON.parse(event.data);
    else if (stream.info) onAnswer(stream.info, event.data);
  };
  ws.onclose = (event) => {
    stream.open = false;
    pause();
    if (event.code !== 1000 && event.code !== 1005) {
      showError(`The stream closed: ${event.reason || "the server could not be reached"} (code ${event.code}).`);
    }
  };
}

function pause() {
  $("video-left").pause();
  $("video-right").pause();
  $("video-play").textContent = "Play";
}

async function play() {
  hideError();
  await connect();
  if (!stream.open) return;
  const left = $("video-left");
  await Promise.all([left.play(), layout() === "pair" && $("video-right").src ? $("video-right").play() : null]);
  $("video-play").textContent = "Pause";
  onVideoFrame();
}

async function step() {
  pause();
  await connect();
  const left = $("video-left");
  if (left.srcObject) return sendFrame(); // cameras: the current frame
  const next = Math.min(left.duration || 0, left.currentTime + 1 / 30);
  const seeked = Promise.all(
    [left, $("video-right")].filter((v) => v.src).map((v) => new Promise((r) => v.addEventListener("seeked", r, { once: true })))
  );
  left.currentTime = next;
  if ($("video-right").src) $("video-right").currentTime = next;
  await seeked;
  sendFrame();
}

function useFile(video, file) {
  if (video.src) URL.revokeObjectURL(video.src);
  video.srcObject = null;
  video.src = URL.createObjectURL(file);
  video.addEventListener(
    "loadeddata",
    () => {
      $("video-play").disabled = false;
      $("video-step").disabled = false;
      $("video-record").disabled = false;
    },
    { once: true }
  );
}

async function useCameras() {
  hideError();
  try {
    // Labels and device IDs come only after a first permission.
    const first = await navigator.mediaDevices.getUserMedia({ video: true });
    first.getTracks().forEach((t) => t.stop());
    const cameras = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
    if (!cameras.length) throw new Error("no camera found");
    const open = (camera) => navigator.mediaDevices.getUserMedia({ video: { deviceId: { exact: camera.deviceId } } });
    const left = $("video-left");
    left.src = "";
    left.srcObject = await open(cameras[0]);
    if (cameras.length >= 2) {
      $("video-layout").value = "pair";
      $("video-right").srcObject = await open(cameras[1]);
    } else if (layout() === "pair") {
      // One device: a stereo camera that sends both views in one frame.
      $("video-layout").value = "sbs";
    }
    onLayout();
    $("video-play").disabled = false;
    $("video-step").disabled = false;
    $("video-record").disabled = false;
  } catch (e) {
    showError(`Could not open the cameras (${e.message}).`);
  }
}

function onLayout() {
  $("video-right-label").hidden = layout() !== "pair";
  sendSettings();
}

function toggleRecording() {
  const button = $("video-record");
  if (stream.recorder) {
    stream.recorder.stop();
    return;
  }
  const chunks = [];
  const recorder = new MediaRecorder($("video-output").captureStream(), { mimeType: "video/webm" });
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = () => {
    const link = $("video-download");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob(chunks, { type: "video/webm" }));
    link.hidden = false;
    stream.recorder = null;
    button.textContent = "Record";
  };
  recorder.start(1000);
  stream.recorder = recorder;
  button.textContent = "Stop recording";
}

function showMode(video) {
  $("video-mode").hidden = !video;
  $("pair-mode").hidden = video;
  $("mode-video").setAttribute("aria-selected", String(video));
  $("mode-pair").setAttribute("aria-selected", String(!video));
  if (!video) pause();
}

export function wireVideo() {
  $("mode-pair").addEventListener("click", () => showMode(false));
  $("mode-video").addEventListener("click", () => showMode(true));
  $("video-file").addEventListener("change", (e) => e.target.files[0] && useFile($("video-left"), e.target.files[0]));
  $("video-file-right").addEventListener("change", (e) => e.target.files[0] && useFile($("video-right"), e.target.files[0]));
  $("video-layout").addEventListener("change", onLayout);
  $("video-calib").addEventListener("change", (e) => e.target.files[0] && useCalibration(e.target.files[0]));
  $("video-format").addEventListener("change", sendSettings);
  $("video-scale").addEventListener("change", sendSettings);
  $("video-sigma").addEventListener("input", sendSettings);
  $("video-play").addEventListener("click", () => ($("video-left").paused ? play() : pause()));
  $("video-step").addEventListener("click", step);
  $("video-cameras").addEventListener("click", useCameras);
  $("video-record").addEventListener("click", toggleRecording);
  const cameras = navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
  $("video-cameras").hidden = !cameras;
}
