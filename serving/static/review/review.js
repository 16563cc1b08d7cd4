// medattn expert review page: plain JavaScript, no library, no network beyond this service.
//
// Coordinates: every ROI, probe and map lives in the *image* pixel frame (the upload's size);
// one view transform (scale, tx, ty) maps image pixels to the screen of every panel, so zoom
// and pan are the same in all panels by construction.
"use strict";

const $ = (id) => document.getElementById(id);
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const TOKEN_KEY = "medattn.review.token";
const KIND_COLOUR = { relevant: "#39d98a", irrelevant: "#ff5c6c" };
const HANDLE_PX = 6;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  principal: null,
  served: null,            // GET /model
  image: null,             // {width, height, grey, format, pixels: ImageData, blob}
  file: null,              // the chosen upload (sent to /predict)
  requestId: null, modelVersion: null, modelName: null,
  prediction: null,        // {label, probabilities, map: Float32Array at image size, method}
  challenger: null,        // {version, map} or {error}
  rois: [], selected: -1, undo: [], redo: [],
  tool: "pan", kind: "relevant", brushRadius: 4,
  view: { scale: 1, tx: 0, ty: 0 },
  opacity: 0.5, window: 255, level: 128, overlay: true, sidePanel: true,
  differences: false, draft: null, drag: null, pointer: null,
  colormaps: null, layers: {}, feedbackKey: null,
};

// ---------------------------------------------------------------- HTTP

async function api(method, path, { body, headers = {}, json } = {}) {
  const h = { ...headers };
  if (state.token) h.Authorization = "Bearer " + state.token;
  if (json !== undefined) { h["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  let resp;
  try { resp = await fetch(path, { method, headers: h, body }); }
  catch (err) { throw new Error(`${method} ${path}: the service is unreachable (${err.message})`); }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!resp.ok) {
    const err = new Error((data && data.detail) || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function imageForm(blob, name) { const f = new FormData(); f.append("image", blob, name || "image"); return f; }

function setStatus(text, bad = false) { const s = $("status"); s.textContent = text; s.classList.toggle("bad", bad); }
function result(id, text, ok) { const el = $(id); el.textContent = text; el.className = "result " + (ok ? "ok" : "bad"); }

// ---------------------------------------------------------------- panels

const PANEL_SETS = {
  review: [{ id: "image", title: "Image + attention overlay" }, { id: "attention", title: "Attention map" }],
  single: [{ id: "image", title: "Image + attention overlay" }],
  differences: [
    { id: "image", title: "Image + regions" },
    { id: "attention", title: "Current map (champion)" },
    { id: "target", title: "Adjusted target (from the regions)" },
    { id: "target_diff", title: "Target − current", diverging: true },
    { id: "challenger", title: "Challenger map" },
    { id: "challenger_diff", title: "Challenger − champion", diverging: true },
  ],
};
let panels = [];

function buildPanels() {
  const set = state.differences ? "differences" : (state.sidePanel ? "review" : "single");
  const host = $("panels");
  host.innerHTML = "";
  host.className = "panels " + { review: "two", single: "one", differences: "six" }[set];
  panels = PANEL_SETS[set].map((def) => {
    const el = document.createElement("div");
    el.className = "panel"; el.dataset.panel = def.id;
    const canvas = document.createElement("canvas");
    const title = document.createElement("div"); title.className = "title"; title.textContent = panelTitle(def);
    const empty = document.createElement("div"); empty.className = "empty";
    el.append(canvas, title, empty);
    if (def.id !== "image") {
      const legend = document.createElement("div"); legend.className = "legend";
      legend.innerHTML = def.diverging ? "−1 <i></i> +1" : "0 <i></i> 1";
      el.append(legend);
    }
    host.append(el);
    const panel = { ...def, el, canvas, ctx: canvas.getContext("2d"), empty };
    attachPointer(panel);
    return panel;
  });
  paintLegends();
  resize();
}

function panelTitle(def) {
  if (def.id === "challenger" && state.challenger && state.challenger.version) return `Challenger map (v${state.challenger.version})`;
  if (def.id === "attention" && state.prediction) return `${def.title.replace(" (champion)", "")} (v${state.prediction.version})`;
  return def.title;
}

function paintLegends() {
  if (!state.colormaps) return;
  for (const p of panels) {
    const i = p.el.querySelector(".legend i");
    if (!i) continue;
    const cmap = state.colormaps[p.diverging ? "difference" : "attention"];
    const stops = [0, 64, 128, 192, 255].map((k) => `rgb(${cmap[k].join(",")})`);
    i.style.background = `linear-gradient(90deg, ${stops.join(",")})`;
  }
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  for (const p of panels) {
    const r = p.el.getBoundingClientRect();
    p.canvas.width = Math.max(1, Math.round(r.width * dpr));
    p.canvas.height = Math.max(1, Math.round(r.height * dpr));
    p.cssW = r.width; p.cssH = r.height; p.dpr = dpr;
  }
  draw();
}

function fitView() {
  if (!state.image || !panels.length) return;
  const p = panels[0];
  const s = Math.min(p.cssW / state.image.width, p.cssH / state.image.height) * 0.95;
  state.view = { scale: s, tx: (p.cssW - state.image.width * s) / 2, ty: (p.cssH - state.image.height * s) / 2 };
  draw();
}

const toImage = (sx, sy) => [(sx - state.view.tx) / state.view.scale, (sy - state.view.ty) / state.view.scale];

// ---------------------------------------------------------------- layers (offscreen, image size)

function canvasOf(w, h) { const c = document.createElement("canvas"); c.width = w; c.height = h; return c; }

function windowedImage() {
  const { width, height, pixels } = state.image;
  const out = new ImageData(width, height);
  const lo = state.level - state.window / 2, k = 255 / state.window;
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) lut[v] = (v - lo) * k;
  const src = pixels.data, dst = out.data;
  for (let i = 0; i < src.length; i += 4) {
    dst[i] = lut[src[i]]; dst[i + 1] = lut[src[i + 1]]; dst[i + 2] = lut[src[i + 2]]; dst[i + 3] = 255;
  }
  const c = canvasOf(width, height); c.getContext("2d").putImageData(out, 0, 0);
  return c;
}

function colouredMap(values, diverging) {
  const { width, height } = state.image;
  const cmap = state.colormaps[diverging ? "difference" : "attention"];
  const img = new ImageData(width, height), d = img.data;
  for (let i = 0; i < values.length; i++) {
    const v = diverging ? (values[i] + 1) / 2 : values[i];
    const c = cmap[Math.max(0, Math.min(255, Math.round(v * 255)))];
    d[4 * i] = c[0]; d[4 * i + 1] = c[1]; d[4 * i + 2] = c[2]; d[4 * i + 3] = 255;
  }
  const cv = canvasOf(width, height); cv.getContext("2d").putImageData(img, 0, 0);
  return cv;
}

// The raw map is at model resolution; PIL's bilinear upsampling (pixel centres) is what the
// service uses for attention_png, and the same sampling is done here for the probe and target.
function upsample(raw, width, height) {
  const { values, width: w, height: h } = raw;
  const out = new Float32Array(width * height);
  const sx = w / width, sy = h / height;
  for (let y = 0; y < height; y++) {
    let fy = (y + 0.5) * sy - 0.5; fy = Math.max(0, Math.min(h - 1, fy));
    const y0 = Math.floor(fy), y1 = Math.min(h - 1, y0 + 1), wy = fy - y0;
    for (let x = 0; x < width; x++) {
      let fx = (x + 0.5) * sx - 0.5; fx = Math.max(0, Math.min(w - 1, fx));
      const x0 = Math.floor(fx), x1 = Math.min(w - 1, x0 + 1), wx = fx - x0;
      const top = values[y0][x0] * (1 - wx) + values[y0][x1] * wx;
      const bot = values[y1][x0] * (1 - wx) + values[y1][x1] * wx;
      out[y * width + x] = Math.max(0, Math.min(1, top * (1 - wy) + bot * wy));
    }
  }
  return out;
}

// Target map: relevant regions raised to 1, irrelevant to 0, the rest as the model had it
// (later regions win where they overlap, as medattn.feedback.schema.feedback_map does).
function targetMap() {
  const base = state.prediction.map, out = Float32Array.from(base);
  for (const roi of state.rois) {
    const mask = roiMask(roi), v = roi.kind === "relevant" ? 1 : 0;
    for (let i = 0; i < mask.length; i++) if (mask[i]) out[i] = v;
  }
  return out;
}

function roiMask(roi) {
  const { width, height } = state.image;
  if (roi.shape === "brush") return roi.mask;
  const c = canvasOf(width, height), g = c.getContext("2d");
  g.fillStyle = "#fff"; g.beginPath();
  if (roi.shape === "rectangle") g.rect(roi.x, roi.y, roi.width, roi.height);
  else { roi.points.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y))); g.closePath(); }
  g.fill();
  const a = g.getImageData(0, 0, width, height).data, m = new Uint8Array(width * height);
  for (let i = 0; i < m.length; i++) m[i] = a[4 * i + 3] >= 128 ? 1 : 0;
  return m;
}

function difference(a, b) { const d = new Float32Array(a.length); for (let i = 0; i < a.length; i++) d[i] = a[i] - b[i]; return d; }

function rebuildLayers() {
  const L = {};
  if (state.image) L.image = windowedImage();
  if (state.prediction && state.colormaps) {
    L.attention = colouredMap(state.prediction.map, false);
    L.values = { attention: state.prediction.map };
    if (state.differences) {
      const target = targetMap();
      L.target = colouredMap(target, false); L.values.target = target;
      const td = difference(target, state.prediction.map);
      L.target_diff = colouredMap(td, true); L.values.target_diff = td;
      if (state.challenger && state.challenger.map) {
        L.challenger = colouredMap(state.challenger.map, false); L.values.challenger = state.challenger.map;
        const cd = difference(state.challenger.map, state.prediction.map);
        L.challenger_diff = colouredMap(cd, true); L.values.challenger_diff = cd;
      }
    }
  }
  state.layers = L;
}

// ---------------------------------------------------------------- drawing

function draw() {
  for (const p of panels) drawPanel(p);
  $("zoom").textContent = state.image ? `zoom ${(state.view.scale * 100).toFixed(0)}%` : "zoom –";
}

function drawPanel(p) {
  const g = p.ctx, L = state.layers;
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.fillStyle = "#000"; g.fillRect(0, 0, p.canvas.width, p.canvas.height);
  p.empty.textContent = "";
  if (!state.image) { p.empty.textContent = p.id === "image" ? "Open a stored prediction or upload an image" : ""; return; }
  const v = state.view;
  g.setTransform(v.scale * p.dpr, 0, 0, v.scale * p.dpr, v.tx * p.dpr, v.ty * p.dpr);
  g.imageSmoothingEnabled = v.scale < 1;
  if (p.id === "image") {
    g.drawImage(L.image, 0, 0);
    if (L.attention && state.overlay && state.opacity > 0) {
      g.globalAlpha = state.opacity; g.drawImage(L.attention, 0, 0); g.globalAlpha = 1;
    }
  } else if (L[p.id]) {
    g.drawImage(L[p.id], 0, 0);
  } else {
    g.setTransform(1, 0, 0, 1, 0, 0);
    p.empty.textContent = !state.prediction ? "Show prediction to see the map"
      : p.id.startsWith("challenger") ? (state.challenger && state.challenger.error) || "loading the challenger…" : "";
    return;
  }
  g.strokeStyle = "#3a4450"; g.lineWidth = 1 / v.scale;
  g.strokeRect(0, 0, state.image.width, state.image.height);
  drawRois(g, p);
  drawCrosshair(g, p);
}

function drawRois(g, p) {
  const s = state.view.scale;
  state.rois.forEach((roi, i) => {
    const colour = KIND_COLOUR[roi.kind], selected = i === state.selected;
    g.lineWidth = (selected ? 2.5 : 1.5) / s; g.strokeStyle = colour;
    g.setLineDash(roi.kind === "irrelevant" ? [5 / s, 3 / s] : []);
    if (roi.shape === "brush") {
      if (p.id === "image") g.drawImage(brushTint(roi), 0, 0);
      else { g.globalAlpha = 0.9; g.drawImage(brushTint(roi, true), 0, 0); g.globalAlpha = 1; }
    } else {
      g.beginPath();
      if (roi.shape === "rectangle") g.rect(roi.x, roi.y, roi.width, roi.height);
      else { roi.points.forEach(([x, y], k) => (k ? g.lineTo(x, y) : g.moveTo(x, y))); g.closePath(); }
      if (p.id === "image") { g.fillStyle = colour + "22"; g.fill(); }
      g.stroke();
    }
    g.setLineDash([]);
    if (selected && p.id === "image") for (const [hx, hy] of handles(roi)) {
      g.fillStyle = "#fff"; const h = HANDLE_PX / s; g.fillRect(hx - h / 2, hy - h / 2, h, h);
    }
    if (p.id === "image") {
      const [lx, ly] = labelAt(roi);
      g.font = `${11 / s}px system-ui`; g.fillStyle = colour; g.fillText(String(i + 1), lx + 2 / s, ly - 3 / s);
    }
  });
  const d = state.draft;
  if (d && p.id === "image") {
    g.strokeStyle = KIND_COLOUR[state.kind]; g.lineWidth = 1.5 / s; g.setLineDash([4 / s, 3 / s]);
    g.beginPath();
    if (d.shape === "rectangle") { const r = normRect(d); g.rect(r.x, r.y, r.width, r.height); }
    if (d.shape === "polygon") {
      d.points.forEach(([x, y], k) => (k ? g.lineTo(x, y) : g.moveTo(x, y)));
      if (state.pointer) g.lineTo(state.pointer[0], state.pointer[1]);
    }
    g.stroke(); g.setLineDash([]);
    if (d.shape === "brush") g.drawImage(brushTint(d), 0, 0);
  }
}

function brushTint(roi, outline) {
  if (roi._tint && roi._tintFor === roi.kind + (outline ? "o" : "") && !roi._dirty) return roi._tint;
  const { width, height } = state.image, img = new ImageData(width, height);
  const hex = KIND_COLOUR[roi.kind], rgb = [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16));
  for (let i = 0; i < roi.mask.length; i++) if (roi.mask[i]) {
    img.data.set(rgb, 4 * i); img.data[4 * i + 3] = outline ? 200 : 110;
  }
  const c = canvasOf(width, height); c.getContext("2d").putImageData(img, 0, 0);
  roi._tint = c; roi._tintFor = roi.kind + (outline ? "o" : ""); roi._dirty = false;
  return c;
}

function drawCrosshair(g, p) {
  if (!state.pointer) return;
  const [x, y] = state.pointer, s = state.view.scale, r = 8 / s;
  g.strokeStyle = "#ffffffcc"; g.lineWidth = 1 / s;
  g.beginPath(); g.moveTo(x - r, y); g.lineTo(x + r, y); g.moveTo(x, y - r); g.lineTo(x, y + r); g.stroke();
}

function normRect(d) {
  return { x: Math.min(d.x0, d.x1), y: Math.min(d.y0, d.y1), width: Math.abs(d.x1 - d.x0), height: Math.abs(d.y1 - d.y0) };
}
function handles(roi) {
  if (roi.shape === "rectangle") return [[roi.x, roi.y], [roi.x + roi.width, roi.y], [roi.x + roi.width, roi.y + roi.height], [roi.x, roi.y + roi.height]];
  if (roi.shape === "polygon") return roi.points;
  return [];
}
function labelAt(roi) {
  if (roi.shape === "rectangle") return [roi.x, roi.y];
  if (roi.shape === "polygon") return roi.points[0];
  const { width } = state.image; const i = roi.mask.indexOf(1);
  return i < 0 ? [0, 0] : [i % width, Math.floor(i / width)];
}

// ---------------------------------------------------------------- ROI edits with undo / redo

const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
function snapshot() { return state.rois.map((r) => ({ ...r, points: r.points && r.points.map((p) => [...p]), mask: r.mask && r.mask.slice() })); }
function beginEdit() { state.undo.push(snapshot()); state.redo = []; }
function commitRois() { state.feedbackKey = null; refreshRoiList(); rebuildIfDifferences(); draw(); }
function undo() { if (!state.undo.length) return; state.redo.push(snapshot()); state.rois = state.undo.pop(); state.selected = -1; commitRois(); }
function redo() { if (!state.redo.length) return; state.undo.push(snapshot()); state.rois = state.redo.pop(); state.selected = -1; commitRois(); }
function rebuildIfDifferences() { if (state.differences) rebuildLayers(); }

function addRoi(roi) { beginEdit(); state.rois.push(roi); state.selected = state.rois.length - 1; commitRois(); }
function deleteSelected() { if (state.selected < 0) return; beginEdit(); state.rois.splice(state.selected, 1); state.selected = -1; commitRois(); }
function setKind(kind) {
  state.kind = kind;
  document.querySelectorAll("#kinds button").forEach((b) => b.classList.toggle("active", b.dataset.kind === kind));
  // while drawing, 1 / 2 choose the kind of the next region; with the select tool they edit one
  const roi = state.tool === "select" ? state.rois[state.selected] : null;
  if (roi && roi.kind !== kind) { beginEdit(); roi.kind = kind; roi._dirty = true; commitRois(); }
}

function refreshRoiList() {
  const list = $("roi-list"); list.innerHTML = "";
  state.rois.forEach((roi, i) => {
    const li = document.createElement("li");
    li.className = i === state.selected ? "selected" : ""; li.dataset.index = i;
    const what = roi.shape === "rectangle" ? `rectangle ${roi.width.toFixed(0)}×${roi.height.toFixed(0)} at (${roi.x.toFixed(0)}, ${roi.y.toFixed(0)})`
      : roi.shape === "polygon" ? `polygon, ${roi.points.length} points` : `brush, ${roi.mask.reduce((a, b) => a + b, 0)} px`;
    li.innerHTML = `<span class="swatch" style="background:${KIND_COLOUR[roi.kind]}"></span><span class="what">${i + 1}. ${roi.kind} ${what}</span>`;
    const flip = document.createElement("button"); flip.textContent = "⇄"; flip.title = "relevant ⇄ irrelevant";
    flip.onclick = (e) => {
      e.stopPropagation(); beginEdit(); roi.kind = roi.kind === "relevant" ? "irrelevant" : "relevant"; roi._dirty = true;
      state.selected = i; commitRois();
    };
    const del = document.createElement("button"); del.textContent = "✕"; del.title = "delete";
    del.onclick = (e) => { e.stopPropagation(); state.selected = i; deleteSelected(); };
    li.append(flip, del);
    li.onclick = () => { state.selected = i; refreshRoiList(); draw(); };
    list.append(li);
  });
  $("roi-count").textContent = state.rois.length;
  $("undo").disabled = !state.undo.length; $("redo").disabled = !state.redo.length;
  $("send-feedback").disabled = !(state.requestId && (state.rois.length || $("corrected-label").value));
}

function hitRoi(x, y) {
  const { width } = state.image;
  for (let i = state.rois.length - 1; i >= 0; i--) {
    const r = state.rois[i];
    if (r.shape === "rectangle" && x >= r.x && x <= r.x + r.width && y >= r.y && y <= r.y + r.height) return i;
    if (r.shape === "polygon" && insidePolygon(x, y, r.points)) return i;
    if (r.shape === "brush" && r.mask[Math.floor(y) * width + Math.floor(x)]) return i;
  }
  return -1;
}
function insidePolygon(x, y, pts) {
  let inside = false;
  for (let i = 0, j = pts.length - 1; i < pts.length; j = i++) {
    const [xi, yi] = pts[i], [xj, yj] = pts[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}
function hitHandle(x, y) {
  const roi = state.rois[state.selected]; if (!roi) return -1;
  const tol = HANDLE_PX / state.view.scale;
  return handles(roi).findIndex(([hx, hy]) => Math.abs(hx - x) <= tol && Math.abs(hy - y) <= tol);
}

function paintBrush(mask, x, y) {
  const { width, height } = state.image, r = state.brushRadius;
  for (let yy = Math.max(0, Math.floor(y - r)); yy <= Math.min(height - 1, Math.ceil(y + r)); yy++)
    for (let xx = Math.max(0, Math.floor(x - r)); xx <= Math.min(width - 1, Math.ceil(x + r)); xx++)
      if ((xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r) mask[yy * width + xx] = 1;
}
function paintStroke(mask, a, b) {
  const steps = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1]) / Math.max(1, state.brushRadius / 2)));
  for (let k = 1; k <= steps; k++) paintBrush(mask, a[0] + ((b[0] - a[0]) * k) / steps, a[1] + ((b[1] - a[1]) * k) / steps);
}

// ---------------------------------------------------------------- pointer: tools, zoom, pan, probe

function attachPointer(p) {
  const c = p.canvas;
  const local = (e) => { const r = c.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  c.addEventListener("wheel", (e) => {
    if (!state.image) return;
    e.preventDefault();
    const [sx, sy] = local(e); zoomAt(sx, sy, Math.exp(-e.deltaY * 0.0015));
  }, { passive: false });
  c.addEventListener("pointerdown", (e) => {
    if (!state.image) return;
    c.setPointerCapture(e.pointerId);
    const [sx, sy] = local(e); const [x, y] = toImage(sx, sy);
    const tool = e.button === 1 ? "pan" : state.tool;
    const inside = x >= 0 && y >= 0 && x <= state.image.width && y <= state.image.height;
    const cx = clamp(x, 0, state.image.width), cy = clamp(y, 0, state.image.height);
    if (tool === "pan") state.drag = { kind: "pan", sx, sy, tx: state.view.tx, ty: state.view.ty };
    else if (tool === "windowlevel") state.drag = { kind: "wl", sx, sy, window: state.window, level: state.level };
    else if (p.id !== "image" && tool !== "select") setStatus("draw on the image panel (left)");
    else if (tool === "rectangle" && inside) state.draft = { shape: "rectangle", x0: cx, y0: cy, x1: cx, y1: cy };
    else if (tool === "polygon" && inside) {
      if (!state.draft) state.draft = { shape: "polygon", points: [] };
      const pts = state.draft.points, first = pts[0];
      if (pts.length >= 3 && Math.hypot(first[0] - cx, first[1] - cy) * state.view.scale < 8) closePolygon();
      else pts.push([cx, cy]);
    } else if (tool === "brush" && inside) {
      state.draft = { shape: "brush", kind: state.kind, mask: new Uint8Array(state.image.width * state.image.height), last: [cx, cy] };
      paintBrush(state.draft.mask, cx, cy);
    } else if (tool === "select") {
      const h = hitHandle(x, y);
      if (h >= 0) { beginEdit(); state.drag = { kind: "handle", handle: h }; }
      else {
        state.selected = hitRoi(x, y);
        if (state.selected >= 0) { beginEdit(); state.drag = { kind: "move", x, y, moved: false }; }
        refreshRoiList();
      }
    }
    draw();
  });
  c.addEventListener("pointermove", (e) => {
    const [sx, sy] = local(e);
    if (!state.image) return;
    const [x, y] = toImage(sx, sy);
    state.pointer = [x, y]; probe(x, y, p);
    const d = state.drag, W = state.image.width, H = state.image.height;
    const cx = clamp(x, 0, W), cy = clamp(y, 0, H);
    if (d && d.kind === "pan") { state.view.tx = d.tx + sx - d.sx; state.view.ty = d.ty + sy - d.sy; }
    else if (d && d.kind === "wl") setWindowLevel(d.window + (sx - d.sx), d.level - (sy - d.sy));
    else if (d && d.kind === "handle") moveHandle(state.rois[state.selected], d.handle, cx, cy);
    else if (d && d.kind === "move") { moveRoi(state.rois[state.selected], x - d.x, y - d.y); d.x = x; d.y = y; d.moved = true; }
    else if (state.draft && state.draft.shape === "rectangle") { state.draft.x1 = cx; state.draft.y1 = cy; }
    else if (state.draft && state.draft.shape === "brush" && e.buttons) {
      paintStroke(state.draft.mask, state.draft.last, [cx, cy]); state.draft.last = [cx, cy]; state.draft._dirty = true;
    }
    draw();
  });
  c.addEventListener("pointerup", () => {
    const d = state.drag; state.drag = null;
    if (d && (d.kind === "handle" || d.kind === "move")) {
      if (d.kind === "move" && !d.moved) state.undo.pop(); // a click that only selected
      const roi = state.rois[state.selected]; if (roi) roi._dirty = true;
      commitRois();
    }
    const dr = state.draft;
    if (dr && dr.shape === "rectangle") {
      state.draft = null; const r = normRect(dr);
      if (r.width >= 1 && r.height >= 1) addRoi({ shape: "rectangle", kind: state.kind, ...r });
    } else if (dr && dr.shape === "brush") {
      state.draft = null; addRoi({ shape: "brush", kind: dr.kind, mask: dr.mask });
    }
    draw();
  });
  c.addEventListener("dblclick", () => { if (state.draft && state.draft.shape === "polygon") closePolygon(); });
  c.addEventListener("pointerleave", () => { state.pointer = null; draw(); });
}

function closePolygon() {
  const pts = state.draft.points; state.draft = null;
  // a double-click also lands as two clicks on the same spot: drop repeated points
  const clean = pts.filter((q, i) => i === 0 || Math.hypot(q[0] - pts[i - 1][0], q[1] - pts[i - 1][1]) > 0.5);
  if (clean.length >= 3) addRoi({ shape: "polygon", kind: state.kind, points: clean });
  else setStatus("a polygon needs at least 3 points", true);
  draw();
}

function moveHandle(roi, h, x, y) {
  if (roi.shape === "polygon") { roi.points[h] = [x, y]; return; }
  const c = handles(roi), opposite = c[(h + 2) % 4];
  Object.assign(roi, normRect({ x0: opposite[0], y0: opposite[1], x1: x, y1: y }));
}

function moveRoi(roi, dx, dy) {
  const W = state.image.width, H = state.image.height;
  if (roi.shape === "rectangle") { roi.x = clamp(roi.x + dx, 0, W - roi.width); roi.y = clamp(roi.y + dy, 0, H - roi.height); }
  else if (roi.shape === "polygon") {
    const xs = roi.points.map((q) => q[0]), ys = roi.points.map((q) => q[1]);
    dx = clamp(dx, -Math.min(...xs), W - Math.max(...xs)); dy = clamp(dy, -Math.min(...ys), H - Math.max(...ys));
    roi.points = roi.points.map(([px, py]) => [px + dx, py + dy]);
  } else {
    roi._acc = [(roi._acc ? roi._acc[0] : 0) + dx, (roi._acc ? roi._acc[1] : 0) + dy];
    const ix = Math.trunc(roi._acc[0]), iy = Math.trunc(roi._acc[1]);
    if (!ix && !iy) return;
    roi._acc = [roi._acc[0] - ix, roi._acc[1] - iy];
    const out = new Uint8Array(roi.mask.length);
    for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) if (roi.mask[y * W + x]) {
      const nx = x + ix, ny = y + iy; if (nx >= 0 && ny >= 0 && nx < W && ny < H) out[ny * W + nx] = 1;
    }
    roi.mask = out; roi._dirty = true;
  }
}

function zoomAt(sx, sy, factor) {
  const v = state.view, s = clamp(v.scale * factor, 0.05, 64), k = s / v.scale;
  state.view = { scale: s, tx: sx - (sx - v.tx) * k, ty: sy - (sy - v.ty) * k };
  draw();
}

function probe(x, y, p) {
  const { width, height } = state.image;
  const ix = Math.floor(x), iy = Math.floor(y);
  const inside = ix >= 0 && iy >= 0 && ix < width && iy < height;
  $("probe").textContent = inside ? `x ${ix}, y ${iy}` : "x –, y –";
  const values = state.layers.values || {};
  const key = values[p.id] ? p.id : "attention";
  const v = inside && values[key] ? values[key][iy * width + ix] : null;
  const grey = inside ? state.image.pixels.data[4 * (iy * width + ix)] : null;
  $("probe-value").textContent = v === null ? "attention –" : `${key === "attention" ? "attention" : key.replace("_", " ")} ${v.toFixed(3)} · grey ${grey}`;
}

// ---------------------------------------------------------------- window / level

function setWindowLevel(w, l) {
  state.window = Math.round(clamp(w, 1, 255)); state.level = Math.round(clamp(l, 0, 255));
  $("window").value = state.window; $("level").value = state.level;
  $("window-value").textContent = state.window; $("level-value").textContent = state.level;
  $("wl").textContent = `W ${state.window} L ${state.level}`;
  if (state.image) { state.layers.image = windowedImage(); draw(); }
}

// ---------------------------------------------------------------- loading images and predictions

async function loadRender(render) {
  const bytes = Uint8Array.from(atob(render.image_png), (ch) => ch.charCodeAt(0));
  const blob = new Blob([bytes], { type: "image/png" });
  const bitmap = await createImageBitmap(blob);
  const c = canvasOf(render.width, render.height), g = c.getContext("2d");
  g.drawImage(bitmap, 0, 0);
  state.image = { width: render.width, height: render.height, grey: render.grey, format: render.format,
                  pixels: g.getImageData(0, 0, render.width, render.height), blob };
  $("image-kind").textContent = `${render.format}, ${render.width}×${render.height} px, ${render.grey ? "grey-level" : "colour"}`;
}

function resetStudy() {
  state.rois = []; state.undo = []; state.redo = []; state.selected = -1; state.draft = null;
  state.prediction = null; state.challenger = null; state.requestId = null; state.feedbackKey = null;
  $("prediction").hidden = true; $("prediction-empty").hidden = false; $("feedback-result").textContent = "";
  if (state.differences) toggleDifferences();
}

function setPrediction(payload, method, requestId) {
  const { width, height } = state.image;
  state.prediction = { label: payload.label, probabilities: payload.probabilities, version: payload.model.version,
                       map: upsample(payload.attention, width, height), method };
  state.requestId = requestId; state.modelVersion = payload.model.version; state.modelName = payload.model.name;
  $("pred-label").textContent = payload.label;
  $("pred-model").textContent = `${payload.model.name} v${payload.model.version}`;
  $("pred-request").textContent = requestId;
  const probs = $("probabilities"); probs.innerHTML = "";
  const top = Math.max(...Object.values(payload.probabilities));
  for (const [name, p] of Object.entries(payload.probabilities)) {
    const row = document.createElement("div"); row.className = "prob" + (p === top ? " top" : "");
    row.innerHTML = `<span>${escapeHtml(name)}</span><div class="bar"><i style="width:${(p * 100).toFixed(1)}%"></i></div><span>${(p * 100).toFixed(1)}%</span>`;
    probs.append(row);
  }
  const sel = $("corrected-label"); sel.innerHTML = '<option value="">(keep the model\'s)</option>';
  for (const name of Object.keys(payload.probabilities)) sel.append(new Option(name, name));
  $("global-note").hidden = !(method && method.global_map);
  $("prediction").hidden = false; $("prediction-empty").hidden = true;
  $("show-differences").disabled = false;
  rebuildLayers(); buildPanelsKeepView(); refreshRoiList();
}

// Same layout: keep the expert's zoom and pan. New layout (differences on/off): panels changed
// size, so fit the image again.
function buildPanelsKeepView() {
  const before = panels.length, v = { ...state.view };
  buildPanels();
  if (panels.length === before) { state.view = v; draw(); } else fitView();
}

async function onFile(file) {
  if (!file) return;
  state.file = file; $("file-name").textContent = file.name;
  resetStudy();
  try {
    setStatus("decoding the image…");
    await loadRender(await api("POST", "/review/api/render", { body: imageForm(file, file.name) }));
    rebuildLayers(); buildPanels(); fitView();
    $("show-prediction").disabled = false;
    setStatus(`${file.name} loaded; press "Show prediction"`);
  } catch (err) { setStatus(err.message, true); }
}

async function showPrediction() {
  if (!state.file) return;
  try {
    setStatus("predicting…");
    const payload = await api("POST", "/predict?raw_attention=true", { body: imageForm(state.file, state.file.name) });
    const method = await api("GET", `/review/api/method?model=${encodeURIComponent(payload.model.version)}`).catch(() => null);
    setPrediction(payload, method, payload.request_id);
    setStatus(`prediction ${payload.label} from v${payload.model.version}; draw regions, then send`);
  } catch (err) { setStatus(err.message, true); }
}

async function openRequest() {
  const id = $("request-id").value.trim();
  if (!id) return;
  resetStudy();
  try {
    setStatus("opening " + id + "…");
    const data = await api("GET", `/review/api/predictions/${encodeURIComponent(id)}`);
    await loadRender(data.render);
    state.file = state.image.blob; $("file-name").textContent = `stored ${id.slice(0, 8)}…`;
    $("show-prediction").disabled = false;
    buildPanels(); fitView();
    if (data.prediction.error) {
      setStatus(`stored prediction opened; its map is unavailable: ${data.prediction.error}`, true);
      return;
    }
    setPrediction({ ...data.prediction, label: data.stored.label, probabilities: data.stored.probabilities,
                    model: data.stored.model }, data.prediction.method, data.stored.request_id);
    setStatus(`stored prediction ${id} (v${data.stored.model.version}, ${data.stored.created_at})`);
  } catch (err) { setStatus(err.message, true); }
}

// ---------------------------------------------------------------- differences

async function toggleDifferences() {
  state.differences = !state.differences;
  $("show-differences").classList.toggle("active", state.differences);
  if (state.differences && state.prediction && !state.challenger) {
    state.challenger = { error: null };
    loadChallenger();
  }
  rebuildLayers(); buildPanelsKeepView();
}

async function loadChallenger() {
  try {
    const payload = await api("POST", "/review/api/predict?model=challenger", { body: imageForm(state.image.blob, "image.png") });
    state.challenger = { version: payload.model.version, label: payload.label,
                         map: upsample(payload.attention, state.image.width, state.image.height) };
    setStatus(`challenger v${payload.model.version} says ${payload.label}; champion v${state.prediction.version} says ${state.prediction.label}`);
  } catch (err) {
    state.challenger = { error: err.status === 404 ? "no challenger registered: " + err.message : err.message };
  }
  rebuildLayers(); buildPanelsKeepView();
}

// ---------------------------------------------------------------- feedback

function roiPayload(roi) {
  if (roi.shape === "rectangle") return { shape: "rectangle", kind: roi.kind, x: roi.x, y: roi.y, width: roi.width, height: roi.height };
  if (roi.shape === "polygon") return { shape: "polygon", kind: roi.kind, points: roi.points };
  const { width, height } = state.image, img = new ImageData(width, height);
  for (let i = 0; i < roi.mask.length; i++) if (roi.mask[i]) { img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = img.data[4 * i + 3] = 255; }
  const c = canvasOf(width, height); c.getContext("2d").putImageData(img, 0, 0);
  return { shape: "brush", kind: roi.kind, mask_png_base64: c.toDataURL("image/png") };
}

async function sendFeedback() {
  if (!state.requestId || !state.principal) { result("feedback-result", "sign in and get a prediction first", false); return; }
  const body = { request_id: state.requestId, model_name: state.modelName, model_version: state.modelVersion,
                 expert_id: state.principal.name, rois: state.rois.map(roiPayload) };
  const label = $("corrected-label").value, comment = $("comment").value.trim();
  if (label) body.corrected_label = label;
  if (comment) body.comment = comment;
  // one key per drawing: resending after a lost answer cannot store the same feedback twice
  state.feedbackKey = state.feedbackKey || crypto.randomUUID();
  $("send-feedback").disabled = true;
  try {
    const receipt = await api("POST", "/feedback", { json: body, headers: { "Idempotency-Key": state.feedbackKey } });
    result("feedback-result", `stored: feedback ${receipt.id} (${body.rois.length} regions)`, true);
    $("feedback-result").dataset.feedbackId = receipt.id;
    setStatus("feedback stored durably");
  } catch (err) { result("feedback-result", err.message, false); }
  refreshRoiList();
}

// ---------------------------------------------------------------- model history, accept, roll back

async function refreshModels() {
  try {
    state.served = await api("GET", "/model");
    const m = state.served.model;
    $("served").innerHTML = m ? `served: <b>${m.name} v${m.version}</b>` : "served: no model loaded";
  } catch (err) { $("served").textContent = "served: " + err.message; }
  let history;
  try { history = await api("GET", "/review/api/models"); }
  catch (err) { result("model-result", err.message, false); return; }
  const body = $("history").querySelector("tbody"); body.innerHTML = "";
  let challenger = null, champion = null;
  for (const v of history.versions) {
    if (v.aliases.includes("challenger")) challenger = v.version;
    if (v.aliases.includes("champion")) champion = v.version;
    const tr = document.createElement("tr"); tr.dataset.version = v.version;
    if (v.aliases.includes("champion")) tr.className = "champion";
    const figs = Object.entries(v.metrics).filter(([k]) => k !== history.metric_key && !k.includes("epoch"))
      .slice(0, 4).map(([k, x]) => `${k.replace(/^test_/, "")} ${x.toFixed(3)}`).join(" · ");
    const notes = [figs, v.tags.rolled_back ? "rolled back" : ""].filter(Boolean).join(" · ");
    tr.innerHTML = `<td>${v.version}</td><td>${v.aliases.map((a) => `<span class="alias ${a}">${a}</span>`).join("")}</td>`
      + `<td>${v.metric === null ? "–" : v.metric.toFixed(3)}</td><td class="figs">${notes || "–"}</td>`;
    body.append(tr);
  }
  state.aliases = { challenger, champion, history: history.champion_history };
  $("accept").disabled = !(challenger && challenger !== champion);
  $("rollback").disabled = !(history.champion_history.filter((x) => x !== champion).length);
}

// ---------------------------------------------------------------- recalibration scheduler

function when(iso) { return iso ? new Date(iso).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "–"; }

async function refreshScheduler() {
  let s;
  try { s = await api("GET", "/review/api/scheduler"); }
  catch (err) { $("sched-running").textContent = err.message; return; }
  $("sched-running").textContent = s.running ? "running" : "idle";
  $("sched-running").className = s.running ? "busy" : "";
  $("sched-up").textContent = s.scheduler_up ? "up" : "not running";
  $("sched-pending").textContent = String(s.pending);
  const outcome = s.last_success === null ? "" : (s.last_success ? " · ok" : " · failed");
  $("sched-last").textContent = when(s.last_run_at) + outcome + (s.last_version ? ` · v${s.last_version}` : "");
  $("sched-last").title = s.last_outcome || "";
  $("sched-next").textContent = !s.pending ? "– (no feedback waits)" : (s.next_run_at ? when(s.next_run_at) : "– (no rules known: no params.yaml and no scheduler check yet)");
}

function confirmDialog(title, text, okLabel) {
  return new Promise((resolve) => {
    $("confirm-title").textContent = title; $("confirm-text").textContent = text; $("confirm-ok").textContent = okLabel;
    $("confirm").hidden = false; $("confirm-ok").focus();
    const done = (ok) => { $("confirm").hidden = true; $("confirm-ok").onclick = $("confirm-cancel").onclick = null; resolve(ok); };
    $("confirm-ok").onclick = () => done(true); $("confirm-cancel").onclick = () => done(false);
  });
}

async function accept() {
  const { challenger, champion } = state.aliases || {};
  if (!await confirmDialog("Accept the challenger?",
    `Version ${challenger} becomes champion (now ${champion || "none"}); the service will serve it. This is recorded under your name.`,
    "Accept")) return;
  await modelAction("/promote", "accepted");
}

async function rollback() {
  const { champion } = state.aliases || {};
  if (!await confirmDialog("Roll back the champion?",
    `Champion version ${champion} is withdrawn and the previous champion is served again. This is recorded under your name.`,
    "Roll back")) return;
  await modelAction("/rollback", "rolled back");
}

async function modelAction(path, verb) {
  try {
    const r = await api("POST", path);
    result("model-result", `${verb}: champion is now v${r.champion.version}`, true);
  } catch (err) {
    result("model-result", err.status === 403 ? "needs an admin token: " + err.message : err.message, false);
  }
  await refreshModels();
}

// ---------------------------------------------------------------- sign-in, controls, keys

async function signIn(token) {
  state.token = token.trim();
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token); else sessionStorage.removeItem(TOKEN_KEY);
  const who = $("whoami");
  try {
    state.principal = await api("GET", "/review/api/whoami");
    who.textContent = `${state.principal.name} (${state.principal.role})`; who.className = "whoami ok";
    await refreshModels();
    await refreshScheduler();
  } catch (err) { state.principal = null; who.textContent = err.message; who.className = "whoami bad"; }
}

function setTool(tool) {
  if (state.draft && tool !== state.draft.shape) state.draft = null;
  state.tool = tool;
  document.querySelectorAll("#tools button").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  draw();
}

const TOOL_KEYS = { v: "select", h: "pan", r: "rectangle", p: "polygon", b: "brush", w: "windowlevel" };

document.addEventListener("keydown", (e) => {
  // letters typed into a text field are text; sliders and checkboxes do not swallow the tool keys
  if (e.target.closest("input:not([type=range]):not([type=checkbox]), textarea, select") || !$("confirm").hidden) return;
  const k = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && k === "z") { e.preventDefault(); e.shiftKey ? redo() : undo(); return; }
  if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); redo(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (TOOL_KEYS[k]) setTool(TOOL_KEYS[k]);
  else if (k === "1") setKind("relevant");
  else if (k === "2") setKind("irrelevant");
  else if (k === "enter" && state.draft && state.draft.shape === "polygon") closePolygon();
  else if (k === "escape") { state.draft = null; state.selected = -1; refreshRoiList(); draw(); }
  else if (k === "delete" || k === "backspace") deleteSelected();
  else if (k === "0") fitView();
  else if (k === "+" || k === "=") zoomCentre(1.25);
  else if (k === "-") zoomCentre(0.8);
  else if (k === "o") { state.overlay = !state.overlay; draw(); }
  else if (k === "d" && state.prediction) toggleDifferences();
  else if (k === "[") state.brushRadius = Math.max(1, state.brushRadius - 1);
  else if (k === "]") state.brushRadius = Math.min(64, state.brushRadius + 1);
  else return;
  e.preventDefault();
});

function zoomCentre(f) { const p = panels[0]; if (p && state.image) zoomAt(p.cssW / 2, p.cssH / 2, f); }

function wire() {
  $("token").value = state.token;
  $("token-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("file").addEventListener("change", (e) => onFile(e.target.files[0]));
  $("open-request").addEventListener("click", openRequest);
  $("request-id").addEventListener("keydown", (e) => { if (e.key === "Enter") openRequest(); });
  $("show-prediction").addEventListener("click", showPrediction);
  $("send-feedback").addEventListener("click", sendFeedback);
  $("corrected-label").addEventListener("change", () => { state.feedbackKey = null; refreshRoiList(); });
  $("comment").addEventListener("input", () => { state.feedbackKey = null; });
  $("show-differences").addEventListener("click", toggleDifferences);
  $("undo").addEventListener("click", undo); $("redo").addEventListener("click", redo);
  $("fit").addEventListener("click", fitView);
  $("accept").addEventListener("click", accept); $("rollback").addEventListener("click", rollback);
  $("sched-refresh").addEventListener("click", refreshScheduler);
  document.querySelectorAll("#tools button").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  document.querySelectorAll("#kinds button").forEach((b) => b.addEventListener("click", () => setKind(b.dataset.kind)));
  $("opacity").addEventListener("input", (e) => { state.opacity = e.target.value / 100; $("opacity-value").textContent = e.target.value + "%"; draw(); });
  $("window").addEventListener("input", (e) => setWindowLevel(+e.target.value, state.level));
  $("level").addEventListener("input", (e) => setWindowLevel(state.window, +e.target.value));
  $("wl-reset").addEventListener("click", () => setWindowLevel(255, 128));
  $("side-panel").addEventListener("change", (e) => { state.sidePanel = e.target.checked; if (!state.differences) buildPanelsKeepView(); });
  window.addEventListener("resize", () => { resize(); });
}

async function start() {
  wire(); buildPanels();
  try { state.colormaps = await api("GET", "/review/api/colormaps"); paintLegends(); }
  catch (err) { setStatus("cannot load the colour maps: " + err.message, true); }
  if (state.token) await signIn(state.token);
}

// The page's state, readable from the browser console (and by the browser tests).
window.reviewState = state;
start();
