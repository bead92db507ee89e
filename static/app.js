// stereo-recon upload page: choose two images, send them to the JSON API, show the result.
// Plain browser JavaScript, no framework and no build step. The page talks to the same
// API scripts use: POST /api/v1/disparity?format=json&include_pfm=true.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const chosen = { left: null, right: null, gt: null }; // Blob (File or fetched example) per input
  let objectUrls = []; // blob: URLs of the current result, revoked on the next one
  let hoverData = null; // { width, height, values: Float32Array } of the current result

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

  function drawColorbar() {
    const canvas = $("bar");
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(canvas.width, canvas.height);
    for (let x = 0; x < canvas.width; x++) {
      const [r, g, b] = turbo(x / (canvas.width - 1));
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

  function setImage(side, blob, name) {
    if (side === "gt") {
      setGroundTruth(blob, name);
      return;
    }
    chosen[side] = blob;
    // The example's ground truth belongs to the example pair, not to a user's own images.
    if (groundTruthFromExample && !name.startsWith("example:")) setGroundTruth(null);
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
      if (files.length >= 2 && side !== "gt") {
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

    $("result-left").src = $("preview-left").src;
    $("result-disparity").src = blobUrl(color, "image/png");
    $("dl-color").href = blobUrl(color, "image/png");
    $("dl-png16").href = blobUrl(png16, "image/png");
    $("dl-pfm").href = blobUrl(pfm, "application/octet-stream");
    $("bar-min").textContent = `${body.disparity.min.toFixed(1)} px`;
    $("bar-max").textContent = `${body.disparity.max.toFixed(1)} px`;
    $("summary").textContent =
      `${body.width}×${body.height} · disparity ${body.disparity.min.toFixed(2)} to ` +
      `${body.disparity.max.toFixed(2)} px (mean ${body.disparity.mean.toFixed(2)}) · ` +
      `${body.model} on ${body.device}`;
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
      const table = document.createElement("table");
      for (const [label, value] of rows) {
        const row = table.insertRow();
        row.insertCell().textContent = label;
        row.insertCell().textContent = value;
      }
      $("evaluation").replaceChildren(table);
    }
    $("result").hidden = false;
  }

  function wireHover() {
    const img = $("result-disparity");
    const readout = $("hover");
    img.addEventListener("mousemove", (e) => {
      if (!hoverData) return;
      const rect = img.getBoundingClientRect();
      const x = Math.floor(((e.clientX - rect.left) / rect.width) * hoverData.width);
      const y = Math.floor(((e.clientY - rect.top) / rect.height) * hoverData.height);
      if (x < 0 || y < 0 || x >= hoverData.width || y >= hoverData.height) return;
      const d = hoverData.values[y * hoverData.width + x];
      readout.textContent = `x ${x}, y ${y}: ${Number.isFinite(d) ? d.toFixed(2) + " px" : "no value"}`;
      readout.style.left = `${e.clientX - rect.left + 12}px`;
      readout.style.top = `${e.clientY - rect.top + 12}px`;
      readout.hidden = false;
    });
    img.addEventListener("mouseleave", () => (readout.hidden = true));
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
      await compute();
    } catch (e) {
      showError(`Could not load the example pair (${e.message}).`);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireDropZone("left");
    wireDropZone("right");
    wireDropZone("gt");
    $("gt-clear").addEventListener("click", () => setGroundTruth(null));
    wireHover();
    drawColorbar();
    $("compute").addEventListener("click", compute);
    const example = $("example");
    if (example) example.addEventListener("click", loadExample);
    refreshStatus();
  });
})();
