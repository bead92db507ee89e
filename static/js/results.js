// A JSON answer on the page: the disparity, deviation and error images with
// their downloads, the figures and timings, the scores against a ground truth,
// and the readouts under the cursor.

import { $, base64ToBytes, blobUrl, revokeResultUrls, wireReadout } from "./dom.js";
import { parsePfm } from "./pfm.js";
import { isHidden, shown } from "./state.js";
import { showReconstruction } from "./depth.js";
import { setupTrust } from "./trust.js";

export function showResult(body) {
  revokeResultUrls();
  const color = base64ToBytes(body.images.color_png);
  const png16 = base64ToBytes(body.images.kitti_png16);
  const pfm = base64ToBytes(body.images.pfm);
  shown.disparity = parsePfm(pfm);
  const sigmaPfm = base64ToBytes(body.images.uncertainty_pfm);
  shown.sigma = parsePfm(sigmaPfm);
  shown.maxSigma = Infinity;

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

export function wireHover() {
  // The readouts sit on the images; the masks above them let the pointer through.
  wireReadout($("result-disparity"), $("hover"), () => shown.disparity, (d, i) => {
    if (!Number.isFinite(d)) return "no value";
    const sigma = shown.sigma ? ` ± ${shown.sigma.values[i].toFixed(2)}` : "";
    return `${isHidden(i) ? "hidden, " : ""}${d.toFixed(2)}${sigma} px`;
  });
  wireReadout($("result-uncertainty"), $("uncertainty-hover"), () => shown.sigma, (s) =>
    Number.isFinite(s) ? `±${s.toFixed(2)} px` : "no value"
  );
}
