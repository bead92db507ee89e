// Depth, camera and distances (when a calibration was sent): the depth view with
// its readout, two clicked points measured in 3D, and each point's position.

import { $, base64ToBytes, blobUrl, pixelUnder, wireReadout } from "./dom.js";
import { parsePfm } from "./pfm.js";
import { isHidden, shown } from "./state.js";
import { buildCloud } from "./cloud.js";

let measured = []; // up to two { x, y, point } picked on the depth image

// Standard deviation of depth z from the disparity's sigma: Z = f B / (d + doffs), so to
// first order sigma_Z = Z^2 / (f B) * sigma (the server's depth_uncertainty).
export function depthSigma(z, sigma) {
  return ((z * z) / (shown.camera.fx * shown.camera.baseline)) * sigma;
}

// 3D point of depth pixel (x, y) in the left camera's frame, or null (no depth, or hidden).
export function pointAt(x, y) {
  const { depth, camera } = shown;
  const i = y * depth.width + x;
  const z = depth.values[i];
  if (!Number.isFinite(z) || isHidden(i)) return null;
  const p = [((x - camera.cx) * z) / camera.fx, ((y - camera.cy) * z) / camera.fy, z];
  return shown.toLeft.map((row) => row[0] * p[0] + row[1] * p[1] + row[2] * p[2]);
}

// The answer's reconstruction: depth view, camera table, and the point cloud's colours.
export function showReconstruction(body) {
  const rec = body.reconstruction;
  for (const id of ["depth-figure", "cloud-figure", "camera", "dl-3d"]) $(id).hidden = !rec;
  shown.cloudPixels = undefined; // until this result's colours are read
  measured = [];
  drawMeasurement();
  if (!rec) {
    shown.depth = null;
    return;
  }
  const camera = rec.camera;
  shown.camera = camera;
  const r = rec.rectification ? rec.rectification.r_left : [[1, 0, 0], [0, 1, 0], [0, 0, 1]];
  shown.toLeft = [0, 1, 2].map((i) => [0, 1, 2].map((j) => r[j][i]));
  const depthPfm = base64ToBytes(body.images.depth_pfm);
  shown.depth = parsePfm(depthPfm);
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

// The depth view's readout and its click-to-measure.
export function wireDepth() {
  const img = $("result-depth");
  wireReadout(img, $("depth-hover"), () => shown.depth, (z, i) => {
    if (!Number.isFinite(z)) return "no depth";
    const sigma = shown.sigma ? ` ± ${depthSigma(z, shown.sigma.values[i]).toFixed(3)}` : "";
    return `${isHidden(i) ? "hidden, " : ""}${z.toFixed(3)}${sigma} ${shown.camera.units}`;
  });
  img.addEventListener("click", (e) => {
    if (!shown.depth) return;
    const at = pixelUnder(img, e, shown.depth);
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
  const { depth, viewer } = shown;
  svg.innerHTML = "";
  if (!depth || !measured.length) {
    text.textContent = "";
    if (viewer) viewer.setLine(null);
    return;
  }
  svg.setAttribute("viewBox", `0 0 ${depth.width} ${depth.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const ns = "http://www.w3.org/2000/svg";
  const r = Math.max(depth.width, depth.height) / 120;
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
    text.textContent = `first point at ${p[2].toFixed(3)} ${shown.camera.units} depth: click a second one`;
    if (viewer) viewer.setLine(null);
    return;
  }
  const [a, b] = measured.map((m) => m.point);
  const distance = Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);
  text.textContent = `distance ${distance.toFixed(3)} ${shown.camera.units}`;
  text.dataset.distance = String(distance);
  if (viewer) viewer.setLine([a, b]);
}
