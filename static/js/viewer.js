// A WebGL point viewer (our own few lines, no library): orbit with the mouse,
// zoom with the wheel, double-click to go back to where the camera stood, and a
// line between two measured points.

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

export function createViewer(canvas) {
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
    // `fovy`: the vertical field of view to start with (the left camera's).
    load(c, fovy) {
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
        fovy,
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
