// The turbo colour map: the same degree-5 polynomial the server uses
// (src/codec/colormap.rs), and the colour bars drawn with it.

import { $ } from "./dom.js";

const TURBO = [
  [0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
  [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
  [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
];

// [r, g, b] (0 to 255) of turbo at t in [0, 1].
export function turbo(t) {
  t = Math.min(1, Math.max(0, t));
  return TURBO.map((c) => {
    let v = 0;
    for (let i = c.length - 1; i >= 0; i--) v = v * t + c[i];
    return Math.round(Math.min(1, Math.max(0, v)) * 255);
  });
}

// Draws the turbo scale into a canvas; reversed for depth, where near (left) is hot.
export function drawColorbar(id = "bar", reversed = false) {
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
