// Choosing the inputs: the two images, the optional ground truth and calibration,
// by click, keyboard, or drag and drop; and the busy state while a pair is computed.

import { $, hideError, showError } from "./dom.js";

export const chosen = { left: null, right: null, gt: null, calib: null }; // Blob (File or fetched example) per input
let groundTruthFromExample = false;
let calibrationFromExample = false;

function describe(blob, img) {
  const kb = (blob.size / 1024).toFixed(0);
  return `${img.naturalWidth}×${img.naturalHeight} · ${kb} KB`;
}

export function setGroundTruth(blob, name, fromExample = false) {
  chosen.gt = blob;
  groundTruthFromExample = Boolean(blob) && fromExample;
  $("info-gt").textContent = blob ? `${name || "ground truth"} · ${(blob.size / 1024).toFixed(0)} KB` : "";
  $("drop-gt").classList.toggle("has-image", Boolean(blob));
  $("gt-clear").hidden = !blob;
  $("result").hidden = true;
}

export function setCalibration(blob, name, fromExample = false) {
  chosen.calib = blob;
  calibrationFromExample = Boolean(blob) && fromExample;
  $("info-calib").textContent = blob ? `${name || "calibration"} · ${(blob.size / 1024).toFixed(1)} KB` : "";
  $("drop-calib").classList.toggle("has-image", Boolean(blob));
  $("calib-clear").hidden = !blob;
  $("result").hidden = true;
}

export function setImage(side, blob, name) {
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

export function wireDropZone(side) {
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

// The busy state with the elapsed time.
let timer = null;
export function setBusy(busy) {
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
