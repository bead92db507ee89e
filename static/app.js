// stereo-recon upload page, the entry module: polls the server's health, sends
// the chosen pair to the same JSON API scripts use (POST /api/v1/disparity?
// format=json&include_pfm=true) and wires the controls. Plain browser ES modules
// from static/js/, no framework and no build step:
// - dom.js: element lookup, errors, base64 and blob URLs, readouts under the cursor
// - colormap.js: the turbo colour map and colour bars; pfm.js: reading PFM maps
// - inputs.js: choosing images, ground truth and calibration; the busy state
// - results.js: a JSON answer on the page; state.js: the maps shown now
// - trust.js: the "hide less certain pixels" slider (masks, point cloud, no request)
// - depth.js: depth, camera and measuring; cloud.js: the point cloud and its PLY
// - viewer.js: the WebGL point viewer (our own few lines, no library)
// - api.js: API calls with the server's key, asked for once when it needs one
// - video.js: the video mode, frames over the WebSocket stream drawn live

import { $, errorMessage, hideError, showError } from "./js/dom.js";
import { apiFetch } from "./js/api.js";
import { drawColorbar } from "./js/colormap.js";
import { chosen, setBusy, setCalibration, setGroundTruth, setImage, wireDropZone } from "./js/inputs.js";
import { showResult, wireHover } from "./js/results.js";
import { onTrustInput } from "./js/trust.js";
import { wireDepth } from "./js/depth.js";
import { wireVideo } from "./js/video.js";

// ---- Status: poll health until the model is ready, then show the device.
async function refreshStatus() {
  const status = $("status");
  try {
    const health = await fetch("/api/v1/health").then((r) => r.json().then((j) => ({ ok: r.ok, j })));
    if (health.ok) {
      status.textContent = `ready · ${health.j.device}`;
      status.className = "status status-ready";
      return;
    }
    status.textContent = health.j.status === "failed" ? "model failed to load" : "model loading…";
    status.className = health.j.status === "failed" ? "status status-error" : "status status-loading";
  } catch (e) {
    status.textContent = "server unreachable";
    status.className = "status status-error";
  }
  setTimeout(refreshStatus, 2000);
}

async function compute() {
  if (!chosen.left || !chosen.right) return;
  hideError();
  setBusy(true);
  const form = new FormData();
  form.append("left", chosen.left, "left");
  form.append("right", chosen.right, "right");
  let url = "/api/v1/disparity?format=json&include_pfm=true";
  if (chosen.gt) {
    form.append("ground_truth", chosen.gt, "ground_truth");
    const scale = $("gt-scale").value.trim();
    if (scale) url += `&gt_scale=${encodeURIComponent(scale)}`;
  }
  if (chosen.calib) {
    form.append("calibration", chosen.calib, "calibration");
    const maxDepth = $("max-depth").value.trim();
    if (maxDepth) url += `&max_depth=${encodeURIComponent(maxDepth)}`;
  }
  try {
    const response = await apiFetch(url, {
      method: "POST",
      body: form,
    });
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    showResult(await response.json());
  } catch (e) {
    showError(`Could not reach the server (${e.message}). Is it still running?`);
  } finally {
    setBusy(false);
  }
}

async function loadExample() {
  hideError();
  try {
    const list = await apiFetch("/api/v1/examples").then((r) => r.json());
    if (!list.examples.length) {
      showError("This server has no example pairs in its data folder.");
      return;
    }
    const example = list.examples[0];
    const [left, right] = await Promise.all(
      [example.left, example.right].map((url) =>
        fetch(url).then((r) => {
          if (!r.ok) throw new Error(`${url}: ${r.status}`);
          return r.blob();
        })
      )
    );
    setImage("left", left, `example: ${example.name}/left.png`);
    setImage("right", right, `example: ${example.name}/right.png`);
    if (example.ground_truth) {
      const truth = await fetch(example.ground_truth).then((r) => r.blob());
      setGroundTruth(truth, `example: ${example.name}/${example.ground_truth.split("/").pop()}`, true);
    } else {
      setGroundTruth(null);
    }
    if (example.calibration) {
      const calib = await fetch(example.calibration).then((r) => r.blob());
      setCalibration(calib, `example: ${example.name}/${example.calibration.split("/").pop()}`, true);
    } else {
      setCalibration(null);
    }
    await compute();
  } catch (e) {
    showError(`Could not load the example pair (${e.message}).`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropZone("left");
  wireDropZone("right");
  wireDropZone("gt");
  wireDropZone("calib");
  $("gt-clear").addEventListener("click", () => setGroundTruth(null));
  $("calib-clear").addEventListener("click", () => setCalibration(null));
  wireHover();
  wireDepth();
  wireVideo();
  drawColorbar();
  drawColorbar("depth-bar", true);
  drawColorbar("uncertainty-bar");
  $("max-sigma").addEventListener("input", onTrustInput);
  $("compute").addEventListener("click", compute);
  const example = $("example");
  if (example) example.addEventListener("click", loadExample);
  refreshStatus();
});
