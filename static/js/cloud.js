// The point cloud of the shown pixels: built from the depth map and the colours
// of the image it refers to, drawn by the WebGL viewer, exported as a PLY.

import { $ } from "./dom.js";
import { shown } from "./state.js";
import { depthSigma, pointAt } from "./depth.js";
import { createViewer } from "./viewer.js";

let plyUrl = null;

// Reads the colours of `img` (when it has the depth's size) and draws a fresh cloud.
export function buildCloud(img) {
  const { width, height } = shown.depth;
  shown.cloudPixels = null;
  if (img && img.naturalWidth === width && img.naturalHeight === height) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    shown.cloudPixels = ctx.getImageData(0, 0, width, height).data;
  }
  refreshCloud(true);
}

// The cloud of the pixels shown now; `fresh` puts the view back where the camera stood.
export function refreshCloud(fresh) {
  const { depth, sigma, cloudPixels, camera } = shown;
  const { width, height } = depth;
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
      if (sigma) {
        const s = sigma.values[i];
        sigmas.push(s, depthSigma(depth.values[i], s));
      }
    }
  }
  const cloud = {
    positions: new Float32Array(positions),
    colours: new Uint8Array(colours),
    sigmas: sigma ? new Float32Array(sigmas) : null,
    count: positions.length / 3,
  };
  if (plyUrl) URL.revokeObjectURL(plyUrl);
  plyUrl = URL.createObjectURL(new Blob([plyBytes(cloud, camera.units)], { type: "application/octet-stream" }));
  $("dl-ply").href = plyUrl;
  const info = $("cloud-info");
  if (!shown.viewer) shown.viewer = createViewer($("cloud"));
  if (!shown.viewer) {
    info.textContent = "this browser has no WebGL: download the PLY to view the points";
    return;
  }
  // The camera's own vertical field of view, to start where the left camera stood.
  if (fresh) shown.viewer.load(cloud, 2 * Math.atan(depth.height / 2 / camera.fy));
  else shown.viewer.replace(cloud);
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
