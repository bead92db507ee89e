// Reading the float32 PFM files of a JSON answer (disparity, deviation, depth).

// Parses a single-channel PFM (rows bottom to top) into { width, height, values }, top row first.
export function parsePfm(bytes) {
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
