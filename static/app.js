// stereo-recon upload page: choose two images, send them to the JSON API, show the result.
// Plain browser JavaScript, no framework and no build step. The page talks to the same
// API scripts use: POST /api/v1/disparity?format=json&include_pfm=true. With a
// calibration it also shows depth, measures distances and draws the point cloud
// with WebGL (our own few lines, no library). The answer's per-pixel standard
// deviation drives the uncertainty view and the "hide less certain pixels"
// slider, which masks the disparity, the depth and the point cloud in the
// browser, without a new request.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const chosen = { left: null, right: null, gt: null, calib: null }; // Blob (File or fetched example) per input
  let objectUrls = []; // blob: URLs of the current result, revoked on the next one
  let hoverData = null; // { width, height, values: Float32Array } of the current result
  let sigmaData = null; // the same for the disparity's standard deviation, px
  let maxSigma = Infinity; // the slider's limit: pixels whose deviation is above it are hidden

  // Whether pixel i is hidden by the slider (a deviation that is not a number counts as above).
  const isHidden = (i) => sigmaData !== null && !(sigmaData.values[i] <= maxSigma);

  // ---- Turbo colormap: the same degree-5 polynomial the server uses (src/codec/colormap.rs).
  const TURBO = [
    [0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
  ];
  function turbo(t) {
    t = Math.min(1, Math.max(0, t));
    return TURBO.map((c) => {
      let v = 0;
      for (let i = c.length - 1; i >= 0; i--) v = v * t + c[i];
      return Math.round(Math.min(1, Math.max(0, v)) * 255);
    });
  }

  // Draws the turbo scale into a canvas; reversed for depth, where near (left) is hot.
  function drawColorbar(id = "bar", reversed = false) {
    const canvas = $(id);
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(canvas.width, canvas.height);
    for (let x = 0; x < canvas.width; x++) {
      const t = x / (canvas.width - 1);
      const [r, g, b] = turbo(reversed ? 1 - t : t);
      for (let y = 0; y < canvas.height; y++) {
        const i = 4 * (y * canvas.width + x);
        image.data.set([r, g, b, 255], i);
      }
    }
    ctx.putImageData(image, 0, 0);
  }

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

  // ---- Choosing images: click, keyboard, drag and drop.
  function describe(blob, img) {
    const kb = (blob.size / 1024).toFixed(0);
    return `${img.naturalWidth}×${img.naturalHeight} · ${kb} KB`;
  }

  let groundTruthFromExample = false;

  function setGroundTruth(blob, name, fromExample = false) {
    chosen.gt = blob;
    groundTruthFromExample = Boolean(blob) && fromExample;
    $("info-gt").textContent = blob ? `${name || "ground truth"} · ${(blob.size / 1024).toFixed(0)} KB` : "";
    $("drop-gt").classList.toggle("has-image", Boolean(blob));
    $("gt-clear").hidden = !blob;
    $("result").hidden = true;
  }

  let calibrationFromExample = false;

  function setCalibration(blob, name, fromExample = false) {
    chosen.calib = blob;
    calibrationFromExample = Boolean(blob) && fromExample;
    $("info-calib").textContent = blob ? `${name || "calibration"} · ${(blob.size / 1024).toFixed(1)} KB` : "";
    $("drop-calib").classList.toggle("has-image", Boolean(blob));
    $("calib-clear").hidden = !blob;
    $("result").hidden = true;
  }

  function setImage(side, blob, name) {
    if (side === "gt") {
      setGroundTruth(blob, name);
      return;
    }
    if (side === "calib") {
      setCalibration(blob, name);
      return;
    }
    chosen[side] = blob;
    // The example's ground truth and calibration belong to the example pair, not to a user's own images.
    if (groundTruthFromExample && !name.startsWith("example:")) setGroundTruth(null);
    if (calibrationFromExample && !name.startsWith("example:")) setCalibration(null);
    const preview = $(`preview-${side}`);
    const url = URL.createObjectURL(blob);
    preview.onload = () => {
      $(`info-${side}`).textContent = `${name ? name + " · " : ""}${describe(blob, preview)}`;
      checkSizes();
    };
    preview.onerror = () => {
      // Browsers cannot preview TIFF; the server can still read it (or will say why not).
      preview.hidden = true;
      $(`info-${side}`).textContent = `${name || "image"} (no preview in this browser)`;
    };
    preview.src = url;
    preview.hidden = false;
    $(`drop-${side}`).classList.add("has-image");
    // A new input makes the shown result stale.
    $("result").hidden = true;
    $("compute").disabled = !(chosen.left && chosen.right);
    hideError();
  }

  function checkSizes() {
    const l = $("preview-left");
    const r = $("preview-right");
    if (!chosen.left || !chosen.right || !l.naturalWidth || !r.naturalWidth) return;
    if (l.naturalWidth !== r.naturalWidth || l.naturalHeight !== r.naturalHeight) {
      showError(
        `The two images differ in size (${l.naturalWidth}×${l.naturalHeight} and ` +
          `${r.naturalWidth}×${r.naturalHeight}). A rectified stereo pair has one size.`
      );
    }
  }

  function wireDropZone(side) {
    const zone = $(`drop-${side}`);
    const input = $(`file-${side}`);
    zone.addEventListener("click", (e) => {
      // input.click() dispatches a click that bubbles back here; ignore that one.
      if (e.target !== input) input.click();
    });
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        input.click();
      }
    });
    input.addEventListener("change", () => {
      if (input.files.length) setImage(side, input.files[0], input.files[0].name);
    });
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      const files = [...e.dataTransfer.files];
      if (files.length >= 2 && side !== "gt" && side !== "calib") {
        // Two files dropped at once: sort by name, first is left (img_L / img_R, 0 / 1 ...).
        files.sort((a, b) => a.name.localeCompare(b.name));
        setImage("left", files[0], files[0].name);
        setImage("right", files[1], files[1].name);
      } else if (files.length === 1) {
        setImage(side, files[0], files[0].name);
      }
    });
  }

  // ---- Errors in plain words.
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }
  function hideError() {
    $("error").hidden = true;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        const retry = response.headers.get("Retry-After");
        const message = body.error.message.charAt(0).toUpperCase() + body.error.message.slice(1);
        return message + (retry ? ` (retry in about ${retry} s)` : "");
      }
    } catch (e) {
      // not JSON: fall through
    }
    return `The server answered ${response.status} ${response.statusText}.`;
  }

  // ---- Busy state with elapsed time.
  let timer = null;
  function setBusy(busy) {
    $("busy").hidden = !busy;
    $("compute").disabled = busy || !(chosen.left && chosen.right);
    const example = $("example");
    if (example) example.disabled = busy;
    clearInterval(timer);
    if (busy) {
      const started = performance.now();
      $("elapsed").textContent = "0.0";
      timer = setInterval(() => {
        $("elapsed").textContent = ((performance.now() - started) / 1000).toFixed(1);
      }, 100);
    }
  }

  // ---- Results.
  function base64ToBytes(b64) {
    const binary = atob(b64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // Parses a single-channel PFM (rows bottom to top) into top-row-first floats.
  function parsePfm(bytes) {
    let pos = 0;
    const tokens = [];
    while (tokens.length < 4) {
      while (pos < bytes.length && /\s/.test(String.fromCharCode(bytes[pos]))) pos++;
      let start = pos;
      while (pos < bytes.length && !/\s/.test(String.fromCharCode(bytes[pos]))) pos++;
      tokens.push(new TextDecoder().decode(bytes.subarray(start, pos)));
    }
    pos++; // the single whitespace byte after the scale
    const [kind, w, h, s] = tokens;
    const width = parseInt(w, 10);
    const height = parseInt(h, 10);
    const little = parseFloat(s) < 0;
    if (kind !== "Pf") throw new Error("unexpected PFM kind " + kind);
    const view = new DataView(bytes.buffer, bytes.byteOffset + pos);
    const values = new Float32Array(width * height);
    for (let row = 0; row < height; row++) {
      const srcRow = height - 1 - row;
      for (let x = 0; x < width; x++) {
        values[row * width + x] = view.getFloat32(4 * (srcRow * width + x), little);
      }
    }
    return { width, height, values };
  }

  function blobUrl(bytes, type) {
    const url = URL.createObjectURL(new Blob([bytes], { type }));
    objectUrls.push(url);
    return url;
  }

  function showResult(body) {
    objectUrls.forEach((u) => URL.revokeObjectURL(u));
    objectUrls = [];
    const color = base64ToBytes(body.images.color_png);
    const png16 = base64ToBytes(body.images.kitti_png16);
    const pfm = base64ToBytes(body.images.pfm);
    hoverData = parsePfm(pfm);
    const sigmaPfm = base64ToBytes(body.images.uncertainty_pfm);
    sigmaData = parsePfm(sigmaPfm);
    maxSigma = Infinity;

    $("result-left").src = $("preview-left").src;
    $("result-disparity").src = blobUrl(color, "image/png");
    $("dl-color").href = blobUrl(color, "image/png");
    $("dl-png16").href = blobUrl(png16, "image/png");
    $("dl-pfm").href = blobUrl(pfm, "application/octet-stream");
    $("dl-uncertainty").href = blobUrl(sigmaPfm, "application/octet-stream");
    $("result-uncertainty").src = blobUrl(base64ToBytes(body.images.uncertainty_png), "image/png");
    $("uncertainty-max").textContent = `${body.uncertainty.color_max.toFixed(2)} px`;
    $("bar-min").textContent = `${body.disparity.min.toFixed(1)} px`;
    $("bar-max").textContent = `${body.disparity.max.toFixed(1)} px`;
    $("summary").textContent =
      `${body.width}×${body.height} · disparity ${body.disparity.min.toFixed(2)} to ` +
      `${body.disparity.max.toFixed(2)} px (mean ${body.disparity.mean.toFixed(2)}) · ` +
      `uncertainty median ±${body.uncertainty.median.toFixed(2)} px, 90 % of pixels within ` +
      `±${body.uncertainty.p90.toFixed(2)} px · ${body.model} on ${body.device}`;
    const t = body.timings_ms;
    $("timings").innerHTML = "";
    for (const [label, key] of [
      ["decode", "decode_ms"],
      ["queue", "queue_ms"],
      ["inference", "inference_ms"],
      ["encode", "encode_ms"],
      ["total", "total_ms"],
    ]) {
      const row = $("timings").insertRow();
      row.insertCell().textContent = label;
      row.insertCell().textContent = `${t[key].toFixed(1)} ms`;
    }
    const evaluation = body.evaluation;
    $("error-figure").hidden = !evaluation;
    $("evaluation").hidden = !evaluation;
    if (evaluation) {
      $("result-error").src = blobUrl(base64ToBytes(body.images.error_png), "image/png");
      const rows = [
        ["EPE", `${evaluation.epe.toFixed(3)} px`],
        ["D1 (> 3 px and > 5 %)", `${evaluation.d1.toFixed(2)} %`],
        ["bad-1 / bad-2 / bad-3", `${evaluation.bad1.toFixed(2)} / ${evaluation.bad2.toFixed(2)} / ${evaluation.bad3.toFixed(2)} %`],
        ["pixels scored", evaluation.valid_pixels.toLocaleString()],
        ["excluded (truth ≥ 192 px)", evaluation.excluded_pixels.toLocaleString()],
      ];
      // How well the deviation ranks the errors: scores over the most certain pixels.
      const sparse = body.sparsification;
      if (sparse) {
        for (const kept of sparse.kept.filter((k) => k.fraction < 1)) {
          rows.push([`most certain ${Math.round(kept.fraction * 100)} %: EPE / D1`, `${kept.epe.toFixed(3)} px / ${kept.d1.toFixed(2)} %`]);
        }
        rows.push(["error within 1σ / 2σ", `${sparse.within_1_sigma.toFixed(1)} / ${sparse.within_2_sigma.toFixed(1)} %`]);
      }
      const table = document.createElement("table");
      for (const [label, value] of rows) {
        const row = table.insertRow();
        row.insertCell().textContent = label;
        row.insertCell().textContent = value;
      }
      $("evaluation").replaceChildren(table);
    }
    $("result").hidden = false;
    showReconstruction(body);
    setupTrust();
  }

  // ---- The "hide less certain pixels" slider. Its position maps to a deviation on a
  // log scale (most pixels are within a pixel, a few reach tens), the right end is "off".
  const TRUST_STEPS = 1000;
  let trustRange = { lo: 0.05, hi: 10 };
  let trustPending = false;

  function sliderToSigma(position) {
    if (position >= TRUST_STEPS) return Infinity;
    return trustRange.lo * Math.pow(trustRange.hi / trustRange.lo, position / TRUST_STEPS);
  }

  function setupTrust() {
    let lo = Infinity;
    let hi = 0;
    for (const v of sigmaData.values) {
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    lo = Math.max(0.01, Number.isFinite(lo) ? lo : 0.01);
    trustRange = { lo, hi: Math.max(hi, lo * 2) };
    const { width, height } = sigmaData;
    for (const id of ["disparity-mask", "depth-mask"]) {
      const canvas = $(id);
      canvas.width = width;
      canvas.height = height;
    }
    $("max-sigma").value = String(TRUST_STEPS);
    applyTrust();
  }

  function onTrustInput() {
    maxSigma = sliderToSigma(Number($("max-sigma").value));
    if (trustPending) return;
    trustPending = true;
    requestAnimationFrame(() => {
      trustPending = false;
      applyTrust();
    });
  }

  // Masks the disparity and depth views (black where hidden, as the server's outputs
  // mark pixels without a value) and rebuilds the point cloud without the hidden pixels.
  function applyTrust() {
    if (!sigmaData) return;
    const { width, height, values } = sigmaData;
    const mask = new ImageData(width, height);
    let count = 0;
    for (let i = 0; i < values.length; i++) {
      if (!(values[i] <= maxSigma)) {
        mask.data[4 * i + 3] = 255; // opaque black
        count++;
      }
    }
    $("disparity-mask").getContext("2d").putImageData(mask, 0, 0);
    if (depthData) $("depth-mask").getContext("2d").putImageData(mask, 0, 0);
    const off = !Number.isFinite(maxSigma);
    $("max-sigma-value").textContent = off ? "off" : `±${maxSigma.toFixed(maxSigma < 1 ? 2 : 1)} px`;
    const percent = ((100 * count) / values.length).toFixed(1);
    $("trust-info").textContent = off
      ? "every pixel shown: move left to hide the pixels the network is least sure of"
      : `${count.toLocaleString()} of ${values.length.toLocaleString()} pixels hidden (${percent} %)`;
    $("trust").dataset.hidden = String(count);
    $("trust").dataset.maxSigma = String(maxSigma); // exact, for scripts and tests
    if (depthData && cloudPixels !== undefined) refreshCloud(false);
  }

  // ---- Depth, distances and the point cloud (when a calibration was sent).
  let depthData = null; // { width, height, values } in the calibration's units (+inf: none)
  let camera = null; // the rectified left camera: fx, fy, cx, cy, baseline, units
  let toLeft = null; // rotation from the rectified frame back to the left camera's (R1ᵀ), row-major
  let measured = []; // up to two { x, y, point } picked on the depth image

  function showReconstruction(body) {
    const rec = body.reconstruction;
    for (const id of ["depth-figure", "cloud-figure", "camera", "dl-3d"]) $(id).hidden = !rec;
    cloudPixels = undefined; // until this result's colours are read
    measured = [];
    drawMeasurement();
    if (!rec) {
      depthData = null;
      return;
    }
    camera = rec.camera;
    const r = rec.rectification ? rec.rectification.r_left : [[1, 0, 0], [0, 1, 0], [0, 0, 1]];
    toLeft = [0, 1, 2].map((i) => [0, 1, 2].map((j) => r[j][i]));
    const depthPfm = base64ToBytes(body.images.depth_pfm);
    depthData = parsePfm(depthPfm);
    const units = camera.units;
    const d = rec.depth;
    $("result-depth").src = blobUrl(base64ToBytes(body.images.depth_color_png), "image/png");
    $("dl-depth").href = blobUrl(depthPfm, "application/octet-stream");
    $("depth-min").textContent = `${d.min.toFixed(2)} ${units}`;
    $("depth-max").textContent = `${d.max.toFixed(2)} ${units}`;
    const table = $("camera");
    table.innerHTML = "";
    const q = (v, digits = 2) => Number(v).toFixed(digits);
    for (const [label, value] of [
      ["calibration", `${rec.calibration_format}${rec.rectified ? ", rectified by the server" : ", already rectified"}`],
      ["focal length", `${q(camera.fx)} px`],
      ["principal point", `${q(camera.cx)}, ${q(camera.cy)} px${camera.doffs ? ` (doffs ${q(camera.doffs)} px)` : ""}`],
      ["baseline", `${q(camera.baseline, 4)} ${units}`],
      ["depth", `${q(d.min)} to ${q(d.max)} ${units}, median ${q(d.median)} ${units}`],
      ["points", `${d.valid_pixels.toLocaleString()} (left out: ${d.out_of_view_pixels.toLocaleString()} out of view, ` +
        `${d.occluded_pixels.toLocaleString()} occluded, ${d.beyond_max_depth_pixels.toLocaleString()} beyond max depth)`],
    ]) {
      const row = table.insertRow();
      row.insertCell().textContent = label;
      row.insertCell().textContent = value;
    }
    // Colours come from the image the depth refers to: the rectified left image when
    // the server rectified the pair, the uploaded left image otherwise.
    const colourSource = body.images.rectified_left_png
      ? blobUrl(base64ToBytes(body.images.rectified_left_png), "image/png")
      : $("preview-left").src;
    const img = new Image();
    img.onload = () => buildCloud(img);
    img.onerror = () => buildCloud(null);
    img.src = colourSource;
  }

  // Standard deviation of depth z from the disparity's sigma: Z = f B / (d + doffs), so to
  // first order sigma_Z = Z^2 / (f B) * sigma (the server's depth_uncertainty).
  function depthSigma(z, sigma) {
    return ((z * z) / (camera.fx * camera.baseline)) * sigma;
  }

  // 3D point of depth pixel (x, y) in the left camera's frame, or null (no depth, or hidden).
  function pointAt(x, y) {
    const i = y * depthData.width + x;
    const z = depthData.values[i];
    if (!Number.isFinite(z) || isHidden(i)) return null;
    const p = [((x - camera.cx) * z) / camera.fx, ((y - camera.cy) * z) / camera.fy, z];
    return toLeft.map((row) => row[0] * p[0] + row[1] * p[1] + row[2] * p[2]);
  }

  function pixelUnder(img, e, data) {
    const rect = img.getBoundingClientRect();
    const x = Math.floor(((e.clientX - rect.left) / rect.width) * data.width);
    const y = Math.floor(((e.clientY - rect.top) / rect.height) * data.height);
    return x < 0 || y < 0 || x >= data.width || y >= data.height ? null : { x, y, rect };
  }

  function wireDepth() {
    const img = $("result-depth");
    wireReadout(img, $("depth-hover"), () => depthData, (z, i) => {
      if (!Number.isFinite(z)) return "no depth";
      const sigma = sigmaData ? ` ± ${depthSigma(z, sigmaData.values[i]).toFixed(3)}` : "";
      return `${isHidden(i) ? "hidden, " : ""}${z.toFixed(3)}${sigma} ${camera.units}`;
    });
    img.addEventListener("click", (e) => {
      if (!depthData) return;
      const at = pixelUnder(img, e, depthData);
      if (!at) return;
      const point = pointAt(at.x, at.y);
      if (!point) {
        $("measure").textContent = `no depth at (${at.x}, ${at.y}): pick a coloured point`;
        return;
      }
      if (measured.length === 2) measured = [];
      measured.push({ x: at.x, y: at.y, point });
      drawMeasurement();
    });
  }

  function drawMeasurement() {
    const svg = $("measure-overlay");
    const text = $("measure");
    svg.innerHTML = "";
    if (!depthData || !measured.length) {
      text.textContent = "";
      if (viewer) viewer.setLine(null);
      return;
    }
    svg.setAttribute("viewBox", `0 0 ${depthData.width} ${depthData.height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const ns = "http://www.w3.org/2000/svg";
    const r = Math.max(depthData.width, depthData.height) / 120;
    if (measured.length === 2) {
      const line = document.createElementNS(ns, "line");
      for (const [k, v] of [["x1", measured[0].x + 0.5], ["y1", measured[0].y + 0.5], ["x2", measured[1].x + 0.5], ["y2", measured[1].y + 0.5]]) {
        line.setAttribute(k, v);
      }
      line.setAttribute("stroke", "white");
      line.setAttribute("stroke-width", r / 2);
      svg.appendChild(line);
    }
    for (const m of measured) {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", m.x + 0.5);
      dot.setAttribute("cy", m.y + 0.5);
      dot.setAttribute("r", r);
      dot.setAttribute("fill", "white");
      dot.setAttribute("stroke", "black");
      svg.appendChild(dot);
    }
    if (measured.length === 1) {
      const p = measured[0].point;
      text.textContent = `first point at ${p[2].toFixed(3)} ${camera.units} depth: click a second one`;
      if (viewer) viewer.setLine(null);
      return;
    }
    const [a, b] = measured.map((m) => m.point);
    const distance = Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    text.textContent = `distance ${distance.toFixed(3)} ${camera.units}`;
    text.dataset.distance = String(distance);
    if (viewer) viewer.setLine([a, b]);
  }

  // ---- WebGL point cloud viewer.
  let viewer = null;
  let cloud = null; // { positions: Float32Array, colours: Uint8Array, sigmas: Float32Array (px, units) | null, count }

  let cloudPixels = undefined; // RGBA of the image the depth refers to (null: none), once per result
  let plyUrl = null;

  function buildCloud(img) {
    const { width, height } = depthData;
    cloudPixels = null;
    if (img && img.naturalWidth === width && img.naturalHeight === height) {
      const canvas = document.createElement("canvas");
      canvas.width = width;
      canvas.height = height;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      cloudPixels = ctx.getImageData(0, 0, width, height).data;
    }
    refreshCloud(true);
  }

  // The cloud of the pixels shown now; `fresh` puts the view back where the camera stood.
  function refreshCloud(fresh) {
    const { width, height } = depthData;
    // Keep the viewer responsive on big images: at most about 400 000 points.
    const step = Math.max(1, Math.ceil(Math.sqrt((width * height) / 400000)));
    const positions = [];
    const colours = [];
    const sigmas = [];
    for (let y = 0; y < height; y += step) {
      for (let x = 0; x < width; x += step) {
        const p = pointAt(x, y);
        if (!p) continue;
        positions.push(p[0], p[1], p[2]);
        const i = y * width + x;
        if (cloudPixels) colours.push(cloudPixels[4 * i], cloudPixels[4 * i + 1], cloudPixels[4 * i + 2]);
        else colours.push(200, 200, 200);
        if (sigmaData) {
          const s = sigmaData.values[i];
          sigmas.push(s, depthSigma(depthData.values[i], s));
        }
      }
    }
    cloud = {
      positions: new Float32Array(positions),
      colours: new Uint8Array(colours),
      sigmas: sigmaData ? new Float32Array(sigmas) : null,
      count: positions.length / 3,
    };
    if (plyUrl) URL.revokeObjectURL(plyUrl);
    plyUrl = URL.createObjectURL(new Blob([plyBytes(cloud, camera.units)], { type: "application/octet-stream" }));
    $("dl-ply").href = plyUrl;
    const info = $("cloud-info");
    if (!viewer) viewer = createViewer($("cloud"));
    if (!viewer) {
      info.textContent = "this browser has no WebGL: download the PLY to view the points";
      return;
    }
    if (fresh) viewer.load(cloud);
    else viewer.replace(cloud);
    info.textContent = `${cloud.count.toLocaleString()} points${step > 1 ? ` (every ${step}th pixel)` : ""}, ${camera.units}`;
    $("cloud").dataset.points = String(cloud.count);
  }

  // Binary little-endian PLY of the shown points, with each point's deviations as the API's
  // format=ply&ply_uncertainty=true writes them (the API's is the full-resolution one).
  function plyBytes(c, units) {
    const header =
      "ply\nformat binary_little_endian 1.0\n" +
      `comment stereo-recon page export; units ${units}; left camera frame: x right, y down, z forward\n` +
      (c.sigmas ? "comment sigma_disparity: standard deviation of the disparity, px; sigma_depth: of the depth, units of x y z\n" : "") +
      `element vertex ${c.count}\nproperty float x\nproperty float y\nproperty float z\n` +
      "property uchar red\nproperty uchar green\nproperty uchar blue\n" +
      (c.sigmas ? "property float sigma_disparity\nproperty float sigma_depth\n" : "") +
      "end_header\n";
    const head = new TextEncoder().encode(header);
    const record = c.sigmas ? 23 : 15;
    const out = new Uint8Array(head.length + record * c.count);
    out.set(head);
    const view = new DataView(out.buffer);
    for (let i = 0; i < c.count; i++) {
      const at = head.length + record * i;
      for (let k = 0; k < 3; k++) view.setFloat32(at + 4 * k, c.positions[3 * i + k], true);
      out.set(c.colours.subarray(3 * i, 3 * i + 3), at + 12);
      if (c.sigmas) {
        view.setFloat32(at + 15, c.sigmas[2 * i], true);
        view.setFloat32(at + 19, c.sigmas[2 * i + 1], true);
      }
    }
    return out;
  }

  // Column-major 4x4 matrices, as WebGL expects them.
  const mat4 = {
    multiply(a, b) {
      const out = new Float32Array(16);
      for (let c = 0; c < 4; c++)
        for (let r = 0; r < 4; r++) {
          let v = 0;
          for (let k = 0; k < 4; k++) v += a[k * 4 + r] * b[c * 4 + k];
          out[c * 4 + r] = v;
        }
      return out;
    },
    perspective(fovy, aspect, near, far) {
      const f = 1 / Math.tan(fovy / 2);
      const nf = 1 / (near - far);
      return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0]);
    },
    lookAt(eye, target, up) {
      const sub = (a, b) => a.map((v, i) => v - b[i]);
      const norm = (v) => {
        const l = Math.hypot(...v) || 1;
        return v.map((x) => x / l);
      };
      const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
      const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
      const z = norm(sub(eye, target));
      const x = norm(cross(up, z));
      const y = cross(z, x);
      return new Float32Array([x[0], y[0], z[0], 0, x[1], y[1], z[1], 0, x[2], y[2], z[2], 0, -dot(x, eye), -dot(y, eye), -dot(z, eye), 1]);
    },
  };

  function createViewer(canvas) {
    const gl = canvas.getContext("webgl", { preserveDrawingBuffer: true, antialias: false });
    if (!gl) return null;
    const compile = (type, source) => {
      const shader = gl.createShader(type);
      gl.shaderSource(shader, source);
      gl.compileShader(shader);
      if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
      return shader;
    };
    const program = gl.createProgram();
    gl.attachShader(program, compile(gl.VERTEX_SHADER,
      "attribute vec3 position; attribute vec3 colour; uniform mat4 mvp; uniform float size; varying vec3 v;" +
      "void main() { gl_Position = mvp * vec4(position, 1.0); gl_PointSize = size; v = colour; }"));
    gl.attachShader(program, compile(gl.FRAGMENT_SHADER,
      "precision mediump float; varying vec3 v; void main() { gl_FragColor = vec4(v, 1.0); }"));
    gl.linkProgram(program);
    gl.useProgram(program);
    const loc = {
      position: gl.getAttribLocation(program, "position"),
      colour: gl.getAttribLocation(program, "colour"),
      mvp: gl.getUniformLocation(program, "mvp"),
      size: gl.getUniformLocation(program, "size"),
    };
    const buffers = { position: gl.createBuffer(), colour: gl.createBuffer(), line: gl.createBuffer(), lineColour: gl.createBuffer() };
    // The orbit: around a target point, from a distance, turned by yaw and pitch.
    const view = { target: [0, 0, 1], distance: 1, yaw: 0, pitch: 0, home: null, fovy: 0.8, count: 0, line: false };
    let pending = false;

    function draw() {
      pending = false;
      const dpr = window.devicePixelRatio || 1;
      const w = Math.round(canvas.clientWidth * dpr) || canvas.width;
      const h = Math.round(canvas.clientHeight * dpr) || canvas.height;
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = w;
        canvas.height = h;
      }
      gl.viewport(0, 0, canvas.width, canvas.height);
      gl.clearColor(0.067, 0.067, 0.067, 1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      gl.enable(gl.DEPTH_TEST);
      // Looking along +z from the camera at yaw = pitch = 0; y points down in camera frames.
      const forward = [Math.sin(view.yaw) * Math.cos(view.pitch), Math.sin(view.pitch), Math.cos(view.yaw) * Math.cos(view.pitch)];
      const eye = view.target.map((t, i) => t - view.distance * forward[i]);
      const projection = mat4.perspective(view.fovy, canvas.width / canvas.height, view.distance / 100, view.distance * 20);
      const mvp = mat4.multiply(projection, mat4.lookAt(eye, view.target, [0, -1, 0]));
      gl.uniformMatrix4fv(loc.mvp, false, mvp);
      const bind = (buffer, attribute, size, type, normalised) => {
        gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
        gl.enableVertexAttribArray(attribute);
        gl.vertexAttribPointer(attribute, size, type, normalised, 0, 0);
      };
      bind(buffers.position, loc.position, 3, gl.FLOAT, false);
      bind(buffers.colour, loc.colour, 3, gl.UNSIGNED_BYTE, true);
      gl.uniform1f(loc.size, Math.max(1, 1.5 * dpr));
      gl.drawArrays(gl.POINTS, 0, view.count);
      if (view.line) {
        gl.disable(gl.DEPTH_TEST);
        bind(buffers.line, loc.position, 3, gl.FLOAT, false);
        bind(buffers.lineColour, loc.colour, 3, gl.UNSIGNED_BYTE, true);
        gl.uniform1f(loc.size, 8 * dpr);
        gl.drawArrays(gl.LINES, 0, 2);
        gl.drawArrays(gl.POINTS, 0, 2);
      }
      canvas.dataset.drawn = String(Number(canvas.dataset.drawn || 0) + 1);
    }
    const redraw = () => {
      if (!pending) {
        pending = true;
        requestAnimationFrame(draw);
      }
    };

    let drag = null;
    canvas.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      view.yaw -= (e.clientX - drag.x) * 0.005;
      view.pitch = Math.max(-1.5, Math.min(1.5, view.pitch - (e.clientY - drag.y) * 0.005));
      drag = { x: e.clientX, y: e.clientY };
      redraw();
    });
    canvas.addEventListener("pointerup", () => (drag = null));
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      view.distance = Math.max(view.home.distance / 50, Math.min(view.home.distance * 20, view.distance * Math.exp(e.deltaY * 0.001)));
      redraw();
    }, { passive: false });
    canvas.addEventListener("dblclick", () => {
      Object.assign(view, view.home);
      redraw();
    });

    // Puts the points into the GPU's buffers.
    function upload(c) {
      gl.bindBuffer(gl.ARRAY_BUFFER, buffers.position);
      gl.bufferData(gl.ARRAY_BUFFER, c.positions, gl.STATIC_DRAW);
      gl.bindBuffer(gl.ARRAY_BUFFER, buffers.colour);
      gl.bufferData(gl.ARRAY_BUFFER, c.colours, gl.STATIC_DRAW);
      view.count = c.count;
    }

    return {
      load(c) {
        upload(c);
        // Start where the left camera stood, orbiting around the median depth ahead of it,
        // with the camera's own vertical field of view.
        const depths = [];
        for (let i = 2; i < c.positions.length; i += 3 * Math.max(1, Math.floor(c.count / 5000))) depths.push(c.positions[i]);
        depths.sort((a, b) => a - b);
        const median = depths.length ? depths[depths.length >> 1] : 1;
        view.home = {
          target: [0, 0, median],
          distance: median,
          yaw: 0,
          pitch: 0,
          fovy: 2 * Math.atan(depthData.height / 2 / camera.fy),
        };
        Object.assign(view, view.home);
        view.line = false;
        redraw();
      },
      // New points (the slider hid or showed some), the view kept where the user left it.
      replace(c) {
        upload(c);
        redraw();
      },
      setLine(points) {
        view.line = Boolean(points);
        if (points) {
          gl.bindBuffer(gl.ARRAY_BUFFER, buffers.line);
          gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([...points[0], ...points[1]]), gl.STATIC_DRAW);
          gl.bindBuffer(gl.ARRAY_BUFFER, buffers.lineColour);
          gl.bufferData(gl.ARRAY_BUFFER, new Uint8Array([255, 255, 255, 255, 255, 255]), gl.STATIC_DRAW);
        }
        redraw();
      },
    };
  }

  // Shows the value under the cursor of a map drawn as an image: `data()` gives the current
  // { width, height, values } (or null), `describe(v)` the text for one value.
  function wireReadout(img, readout, data, describe) {
    img.addEventListener("mousemove", (e) => {
      const map = data();
      if (!map) return;
      const at = pixelUnder(img, e, map);
      if (!at) return;
      const i = at.y * map.width + at.x;
      readout.textContent = `x ${at.x}, y ${at.y}: ${describe(map.values[i], i)}`;
      readout.style.left = `${e.clientX - at.rect.left + 12}px`;
      readout.style.top = `${e.clientY - at.rect.top + 12}px`;
      readout.hidden = false;
    });
    img.addEventListener("mouseleave", () => (readout.hidden = true));
  }

  function wireHover() {
    // The readouts sit on the images; the masks above them let the pointer through.
    wireReadout($("result-disparity"), $("hover"), () => hoverData, (d, i) => {
      if (!Number.isFinite(d)) return "no value";
      const sigma = sigmaData ? ` ± ${sigmaData.values[i].toFixed(2)}` : "";
      return `${isHidden(i) ? "hidden, " : ""}${d.toFixed(2)}${sigma} px`;
    });
    wireReadout($("result-uncertainty"), $("uncertainty-hover"), () => sigmaData, (s) =>
      Number.isFinite(s) ? `±${s.toFixed(2)} px` : "no value"
    );
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
      const response = await fetch(url, {
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
      const list = await fetch("/api/v1/examples").then((r) => r.json());
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
    drawColorbar();
    drawColorbar("depth-bar", true);
    drawColorbar("uncertainty-bar");
    $("max-sigma").addEventListener("input", onTrustInput);
    $("compute").addEventListener("click", compute);
    const example = $("example");
    if (example) example.addEventListener("click", loadExample);
    refreshStatus();
  });
})();
