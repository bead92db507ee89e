// What the page shows now: the current result's maps, read by the views that
// draw, mask and measure them. One object, so every module sees the same values.

export const shown = {
  disparity: null, // { width, height, values: Float32Array } of the current result, px
  sigma: null, // the same for the disparity's standard deviation, px
  maxSigma: Infinity, // the slider's limit: pixels whose deviation is above it are hidden
  depth: null, // { width, height, values } in the calibration's units (+inf: none)
  camera: null, // the rectified left camera: fx, fy, cx, cy, baseline, units
  toLeft: null, // rotation from the rectified frame back to the left camera's (R1ᵀ), row-major
  cloudPixels: undefined, // RGBA of the image the depth refers to (null: none), once per result
  viewer: null, // the WebGL point viewer, once made
};

// Whether pixel i is hidden by the slider (a deviation that is not a number counts as above).
export const isHidden = (i) => shown.sigma !== null && !(shown.sigma.values[i] <= shown.maxSigma);
