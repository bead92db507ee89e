// The "hide less certain pixels" slider. Its position maps to a deviation on a
// log scale (most pixels are within a pixel, a few reach tens), the right end is
// "off". It masks the disparity and depth views and rebuilds the point cloud in
// the browser, without a new request.

import { $ } from "./dom.js";
import { shown } from "./state.js";
import { refreshCloud } from "./cloud.js";

const TRUST_STEPS = 1000;
let trustRange = { lo: 0.05, hi: 10 };
let trustPending = false;

function sliderToSigma(position) {
  if (position >= TRUST_STEPS) return Infinity;
  return trustRange.lo * Math.pow(trustRange.hi / trustRange.lo, position / TRUST_STEPS);
}

// Fits the slider's range to the new result's deviations and shows every pixel.
export function setupTrust() {
  let lo = Infinity;
  let hi = 0;
  for (const v of shown.sigma.values) {
    if (Number.isFinite(v)) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  lo = Math.max(0.01, Number.isFinite(lo) ? lo : 0.01);
  trustRange = { lo, hi: Math.max(hi, lo * 2) };
  const { width, height } = shown.sigma;
  for (const id of ["disparity-mask", "depth-mask"]) {
    const canvas = $(id);
    canvas.width = width;
    canvas.height = height;
  }
  $("max-sigma").value = String(TRUST_STEPS);
  applyTrust();
}

export function onTrustInput() {
  shown.maxSigma = sliderToSigma(Number($("max-sigma").value));
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
  if (!shown.sigma) return;
  const { maxSigma } = shown;
  const { width, height, values } = shown.sigma;
  const mask = new ImageData(width, height);
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    if (!(values[i] <= maxSigma)) {
      mask.data[4 * i + 3] = 255; // opaque black
      count++;
    }
  }
  $("disparity-mask").getContext("2d").putImageData(mask, 0, 0);
  if (shown.depth) $("depth-mask").getContext("2d").putImageData(mask, 0, 0);
  const off = !Number.isFinite(maxSigma);
  $("max-sigma-value").textContent = off ? "off" : `±${maxSigma.toFixed(maxSigma < 1 ? 2 : 1)} px`;
  const percent = ((100 * count) / values.length).toFixed(1);
  $("trust-info").textContent = off
    ? "every pixel shown: move left to hide the pixels the network is least sure of"
    : `${count.toLocaleString()} of ${values.length.toLocaleString()} pixels hidden (${percent} %)`;
  $("trust").dataset.hidden = String(count);
  $("trust").dataset.maxSigma = String(maxSigma); // exact, for scripts and tests
  if (shown.depth && shown.cloudPixels !== undefined) refreshCloud(false);
}
