// Suanli annotation tool: draw, move and resize boxes, polygons and points over a task's
// images, with labels, attributes, zoom and pan, undo/redo, pre-annotations to accept or fix,
// and autosave (a change is on the server within about a second; leaving the page sends what
// is pending with `keepalive`). Plain JavaScript on a <canvas>, no build step.
"use strict";

// Masks: COCO's uncompressed RLE, `{size: [height, width], counts}`, runs of background and
// foreground pixels alternating down each column in turn, background first (the form the
// server checks and exports). The brush paints into a row-major bitmap of the image and the
// stroke's pixels are the ones whose centre lies within the brush's radius of the pointer's
// path, so a stroke is the same mask on every screen and zoom.
const Masks = (() => {
  const cache = new WeakMap();
  // The set pixels' bounding box [x0, y0, x1, y1) (x1/y1 exclusive), or null.
  function bounds(rle) {
    const h = rle.size[0];
    let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1, at = 0;
    rle.counts.forEach((c, i) => {
      const start = at;
      at += c;
      if (i % 2 === 0 || c === 0) return;
      const first = start, last = start + c - 1;
      const fx = Math.floor(first / h), lx = Math.floor(last / h);
      x0 = Math.min(x0, fx); x1 = Math.max(x1, lx + 1);
      if (fx === lx) { y0 = Math.min(y0, first % h); y1 = Math.max(y1, (last % h) + 1); } else { y0 = 0; y1 = h; }
    });
    return x1 < 0 ? null : [x0, y0, x1, y1];
  }
  // Calls `set(x, y)` for every pixel of the mask.
  function forEachPixel(rle, set) {
    const h = rle.size[0];
    let at = 0;
    rle.counts.forEach((c, i) => {
      if (i % 2 === 1) for (let k = at; k < at + c; k++) set(Math.floor(k / h), k % h);
      at += c;
    });
  }
  function get(rle, x, y) {
    const index = x * rle.size[0] + y;
    let at = 0;
    for (let i = 0; i < rle.counts.length; i++) {
      at += rle.counts[i];
      if (index < at) return i % 2 === 1;
    }
    return false;
  }
  // The RLE of a row-major bitmap whose set pixels all lie in columns [x0, x1).
  function encode(bitmap, width, height, [x0, , x1]) {
    const counts = [];
    let fg = false, runStart = 0;
    for (let x = x0; x < x1; x++) {
      for (let y = 0; y < height; y++) {
        if ((bitmap[y * width + x] === 1) === fg) continue;
        counts.push(x * height + y - runStart);
        runStart = x * height + y;
        fg = !fg;
      }
    }
    const total = width * height;
    if (fg) { counts.push(x1 * height - runStart); runStart = x1 * height; }
    if (total > runStart || !counts.length) counts.push(total - runStart);
    return { size: [height, width], counts };
  }
  // Sets (value 1) or clears (0) every pixel whose centre is within `r` of segment a-b, inside
  // the image; returns the box of pixels it looked at.
  function paintSegment(bitmap, width, height, [ax, ay], [bx, by], r, value) {
    const x0 = Math.max(0, Math.floor(Math.min(ax, bx) - r)), x1 = Math.min(width, Math.ceil(Math.max(ax, bx) + r) + 1);
    const y0 = Math.max(0, Math.floor(Math.min(ay, by) - r)), y1 = Math.min(height, Math.ceil(Math.max(ay, by) + r) + 1);
    const dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy, r2 = r * r;
    for (let y = y0; y < y1; y++) {
      for (let x = x0; x < x1; x++) {
        const px = x + 0.5, py = y + 0.5;
        const t = len2 ? Math.max(0, Math.min(1, ((px - ax) * dx + (py - ay) * dy) / len2)) : 0;
        const ex = px - (ax + t * dx), ey = py - (ay + t * dy);
        if (ex * ex + ey * ey <= r2) bitmap[y * width + x] = value;
      }
    }
    return [x0, y0, x1, y1];
  }
  // The mask as a bitmap canvas of its bounding box, in `colour` (cached per RLE object).
  function picture(rle, colour) {
    const hit = cache.get(rle);
    if (hit && hit.colour === colour) return hit;
    const box = bounds(rle);
    if (!box) return null;
    const [x0, y0, x1, y1] = box;
    const canvas = document.createElement("canvas");
    canvas.width = x1 - x0; canvas.height = y1 - y0;
    const c2 = canvas.getContext("2d");
    const data = c2.createImageData(canvas.width, canvas.height);
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
    forEachPixel(rle, (x, y) => {
      const o = ((y - y0) * canvas.width + (x - x0)) * 4;
      data.data[o] = r; data.data[o + 1] = g; data.data[o + 2] = b; data.data[o + 3] = 110;
    });
    c2.putImageData(data, 0, 0);
    const out = { canvas, box, colour };
    cache.set(rle, out);
    return out;
  }
  return { bounds, forEachPixel, get, encode, paintSegment, picture };
})();

(() => {
  const root = document.getElementById("annotator");
  if (!root) return;
  const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";
  const project = Number(root.dataset.project), task = Number(root.dataset.task), slot = Number(root.dataset.slot);
  const schema = JSON.parse(root.dataset.schema);
  const base = `/api/v1/annotation-projects/${project}`;
  const slotPath = `${base}/tasks/${task}/slots/${slot}`;
  const canvas = root.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  const statusEl = root.querySelector(".save-state");
  const nameEl = root.querySelector(".image-name");
  const listEl = root.querySelector("ul.shapes");
  const attrsEl = root.querySelector(".attributes");
  const colour = Object.fromEntries(schema.classes.map((c) => [c.name, c.colour]));
  const SAVE_AFTER_MS = 700, HANDLE = 6, CLOSE_PX = 8;

  // Everything the page holds, by image.
  let images = [];
  let current = 0;
  let tool = "box";
  let label = schema.classes[0].name;
  let selected = null; // a shape's id
  let draft = null; // a shape being drawn
  let drag = null; // {kind: "move"|"handle"|"pan"|"stroke", …}
  let stroke = null; // a brush or eraser stroke: {erase, target, points}
  let brush = 10; // the brush's radius, image pixels
  let pointer = null; // the pointer over the canvas (image pixels), for the brush's outline
  let view = { s: 1, ox: 0, oy: 0 };
  let lost = false;
  let lastActivity = 0, activeSince = Date.now(), activeMs = 0;
  let shapeSeq = 0;

  const img = () => images[current];
  const newId = () => `s${Date.now().toString(36)}${(shapeSeq++).toString(36)}`;
  const round = (v) => Math.round(v * 100) / 100;
  const clone = (v) => JSON.parse(JSON.stringify(v));

  function setStatus(text, kind) {
    statusEl.textContent = text;
    statusEl.dataset.state = kind;
  }

  // ---- time worked: counted while there was input in the last 30 s ----
  function touch() {
    const now = Date.now();
    if (now - lastActivity < 30000) activeMs += now - Math.max(lastActivity, activeSince);
    lastActivity = now;
  }

  // ---- the server ----
  async function api(method, path, body, keepalive) {
    const text = body === undefined ? undefined : JSON.stringify(body);
    const r = await fetch(path, {
      method,
      credentials: "same-origin",
      // Browsers refuse keepalive bodies over 64 KiB (a big mask): those go as a plain request,
      // which still completes if the page lives on a moment.
      keepalive: !!keepalive && (text === undefined || text.length < 60000),
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrf() },
      body: text,
    });
    const answer = await r.text();
    const json = answer ? JSON.parse(answer) : null;
    if (!r.ok) throw Object.assign(new Error(json?.error?.message || r.statusText), { status: r.status, code: json?.error?.code, body: json });
    return json;
  }

  async function load() {
    const slotView = await api("GET", slotPath);
    images = slotView.images.map((i) => ({
      ...i,
      shapes: i.revision > 0 ? i.shapes : i.pre.map((p) => ({ ...p, id: newId() })),
      dirty: i.revision === 0 && i.pre.length > 0,
      undo: [],
      redo: [],
      bitmap: null,
      saving: null,
    }));
    if (slotView.state !== "held") lock("this task is submitted: read only");
    await show(0);
    root.dataset.ready = "1";
    performance.mark("annotator-ready");
  }

  function lock(why) {
    lost = true;
    setStatus(why, "lost");
    root.querySelectorAll("button[data-action='submit']").forEach((b) => (b.disabled = true));
  }

  // Saves every changed image; at most one save per image in flight, its revision chained.
  async function saveImage(i, keepalive) {
    const im = images[i];
    if (!im.dirty || lost) return;
    if (im.saving) return im.saving.then(() => saveImage(i, keepalive));
    im.dirty = false;
    touch();
    const shapes = clone(im.shapes);
    const worked = activeMs;
    activeMs = 0;
    setStatus("saving…", "saving");
    im.saving = api("PUT", `${slotPath}/images/${im.position}`, { shapes, revision: im.revision, active_ms: worked }, keepalive)
      .then((r) => {
        im.revision = r.revision;
        if (!images.some((x) => x.dirty)) setStatus("saved", "saved");
      })
      .catch(async (e) => {
        activeMs += worked;
        if (e.code === "TASK_NOT_HELD") lock("this task is no longer yours (its lease ran out)");
        else if (e.code === "INVALID_TRANSITION") lock("this task is submitted: read only");
        else if (e.code === "STALE_REVISION") await rebase(im, shapes);
        else if (e.code === "INVALID_ARGUMENT") {
          // The server refused a shape: say which and why; the next change saves again.
          const index = Number((e.body?.error?.fields?.[0]?.field || "").match(/^shapes\[(\d+)\]$/)?.[1]);
          if (images[current] === im && Number.isInteger(index) && im.shapes[index]) { selected = im.shapes[index].id; redraw(); }
          setStatus(`not saved: ${e.body?.error?.fields?.[0]?.problem || e.message}`, "error");
        } else {
          im.dirty = true;
          setStatus(`not saved: ${e.message}`, "error");
        }
      })
      .finally(() => (im.saving = null));
    return im.saving;
  }

  // A save refused as stale: if the server holds exactly what this page sent last (the answer
  // to an earlier save was lost), take its revision and save again; anything else was saved from
  // another tab, which this page must not overwrite.
  async function rebase(im, sent) {
    try {
      const now = (await api("GET", slotPath)).images.find((x) => x.position === im.position);
      if (now && now.revision === im.revision + 1 && JSON.stringify(now.shapes) === JSON.stringify(sent)) {
        im.revision = now.revision;
        if (JSON.stringify(im.shapes) !== JSON.stringify(sent)) im.dirty = true;
        if (im.dirty) changed(im);
        else setStatus("saved", "saved");
        return;
      }
    } catch (_) {
      // Fall through: locked below.
    }
    lock("saved from another tab meanwhile: reload the page");
  }

  let saveTimer = null;
  function changed(which) {
    (which || img()).dirty = true;
    setStatus("unsaved", "dirty");
    clearTimeout(saveTimer);
    saveTimer = setTimeout(() => images.forEach((_, i) => saveImage(i)), SAVE_AFTER_MS);
  }
  const flush = () => images.forEach((_, i) => saveImage(i, true));
  window.addEventListener("pagehide", flush);
  document.addEventListener("visibilitychange", () => document.visibilityState === "hidden" && flush());

  // ---- undo / redo: snapshots of the image's shapes ----
  function record() {
    img().undo.push(clone(img().shapes));
    if (img().undo.length > 200) img().undo.shift();
    img().redo = [];
  }
  function undo() {
    const im = img();
    if (!im.undo.length) return;
    im.redo.push(clone(im.shapes));
    im.shapes = im.undo.pop();
    selected = null;
    changed();
    redraw();
  }
  function redoIt() {
    const im = img();
    if (!im.redo.length) return;
    im.undo.push(clone(im.shapes));
    im.shapes = im.redo.pop();
    selected = null;
    changed();
    redraw();
  }

  // ---- geometry ----
  const toImage = (sx, sy) => [(sx - view.ox) / view.s, (sy - view.oy) / view.s];
  const toCanvas = (x, y) => [x * view.s + view.ox, y * view.s + view.oy];
  const clampX = (x) => Math.min(Math.max(x, 0), img().width);
  const clampY = (y) => Math.min(Math.max(y, 0), img().height);
  function eventPoint(e) {
    const r = canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  }
  function vertices(s) {
    if (s.type === "mask") {
      const [x0, y0, x1, y1] = Masks.bounds(s.rle) || [0, 0, 0, 0];
      return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
    }
    if (s.type === "box") return [[s.x, s.y], [s.x + s.w, s.y], [s.x + s.w, s.y + s.h], [s.x, s.y + s.h]];
    return s.points;
  }
  function inside(s, x, y) {
    if (s.type === "mask") return x >= 0 && y >= 0 && x < s.rle.size[1] && y < s.rle.size[0] && Masks.get(s.rle, Math.floor(x), Math.floor(y));
    if (s.type === "box") return x >= s.x && x <= s.x + s.w && y >= s.y && y <= s.y + s.h;
    if (s.type === "polygon") {
      let hit = false;
      for (let i = 0, j = s.points.length - 1; i < s.points.length; j = i++) {
        const [xi, yi] = s.points[i], [xj, yj] = s.points[j];
        if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) hit = !hit;
      }
      return hit;
    }
    if (s.type === "polyline") return s.points.slice(1).some(([bx, by], i) => segmentDistance(x, y, s.points[i], [bx, by]) * view.s < HANDLE);
    return s.points.some(([px, py]) => Math.hypot(px - x, py - y) * view.s < HANDLE * 1.5);
  }
  function segmentDistance(x, y, [ax, ay], [bx, by]) {
    const [dx, dy] = [bx - ax, by - ay];
    const t = dx || dy ? Math.max(0, Math.min(1, ((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy))) : 0;
    return Math.hypot(x - (ax + t * dx), y - (ay + t * dy));
  }
  function handleAt(s, sx, sy) {
    if (s.type === "mask") return -1; // painted, not resized
    const vs = vertices(s);
    for (let i = 0; i < vs.length; i++) {
      const [cx, cy] = toCanvas(vs[i][0], vs[i][1]);
      if (Math.abs(cx - sx) <= HANDLE && Math.abs(cy - sy) <= HANDLE) return i;
    }
    return -1;
  }
  function normalizeBox(s) {
    if (s.w < 0) { s.x += s.w; s.w = -s.w; }
    if (s.h < 0) { s.y += s.h; s.h = -s.h; }
    s.x = round(s.x); s.y = round(s.y); s.w = round(s.w); s.h = round(s.h);
  }

  // ---- drawing ----
  // The canvas on whole CSS pixels: its pixels are then the screen's (crisp), and a pointer
  // at a whole viewport pixel is a whole canvas pixel.
  function align() {
    canvas.style.transform = "none";
    const r = canvas.getBoundingClientRect();
    canvas.style.transform = `translate(${-(r.left - Math.floor(r.left))}px, ${-(r.top - Math.floor(r.top))}px)`;
  }
  window.addEventListener("resize", align);

  function fit() {
    align();
    const im = img();
    const s = Math.min(1, canvas.width / im.width, canvas.height / im.height);
    view = { s, ox: Math.floor((canvas.width - im.width * s) / 2), oy: Math.floor((canvas.height - im.height * s) / 2) };
  }
  function path(s) {
    ctx.beginPath();
    const vs = vertices(s);
    vs.forEach(([x, y], i) => {
      const [cx, cy] = toCanvas(x, y);
      i ? ctx.lineTo(cx, cy) : ctx.moveTo(cx, cy);
    });
    if (s.type !== "polyline") ctx.closePath();
  }
  function drawShape(s, isSelected) {
    const c = colour[s.label] || "#ffffff";
    ctx.save();
    ctx.strokeStyle = c;
    ctx.fillStyle = c + "33";
    ctx.lineWidth = isSelected ? 3 : 2;
    ctx.setLineDash(s.score !== undefined ? [6, 4] : []);
    if (s.type === "mask") {
      const pic = Masks.picture(s.rle, c);
      if (pic) {
        const [x0, y0, x1, y1] = pic.box;
        const [cx, cy] = toCanvas(x0, y0);
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(pic.canvas, cx, cy, (x1 - x0) * view.s, (y1 - y0) * view.s);
        if (isSelected) { ctx.setLineDash([4, 3]); ctx.strokeRect(cx, cy, (x1 - x0) * view.s, (y1 - y0) * view.s); }
      }
      ctx.restore();
      return;
    }
    if (s.type === "points") {
      for (const [x, y] of s.points) {
        const [cx, cy] = toCanvas(x, y);
        ctx.beginPath();
        ctx.arc(cx, cy, 4, 0, Math.PI * 2);
        ctx.fillStyle = c;
        ctx.fill();
      }
    } else {
      path(s);
      if (s.type !== "polyline") ctx.fill();
      ctx.stroke();
    }
    if (isSelected) {
      ctx.setLineDash([]);
      ctx.fillStyle = "#ffffff";
      for (const [x, y] of vertices(s)) {
        const [cx, cy] = toCanvas(x, y);
        ctx.fillRect(cx - HANDLE / 2, cy - HANDLE / 2, HANDLE, HANDLE);
        ctx.strokeRect(cx - HANDLE / 2, cy - HANDLE / 2, HANDLE, HANDLE);
      }
    }
    ctx.restore();
  }
  function redraw() {
    const im = img();
    ctx.fillStyle = "#222";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (im.bitmap) ctx.drawImage(im.bitmap, view.ox, view.oy, im.width * view.s, im.height * view.s);
    for (const s of im.shapes) drawShape(s, s.id === selected);
    if (draft) {
      drawShape(draft, true);
      if ((draft.type === "polygon" || draft.type === "polyline") && draft.cursor) {
        const last = draft.points[draft.points.length - 1];
        ctx.beginPath();
        ctx.moveTo(...toCanvas(last[0], last[1]));
        ctx.lineTo(...toCanvas(draft.cursor[0], draft.cursor[1]));
        ctx.strokeStyle = colour[draft.label];
        ctx.stroke();
      }
    }
    if (stroke) {
      // The stroke as the pointer went; painted into the mask when the button is released.
      ctx.save();
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.lineWidth = 2 * brush * view.s;
      ctx.strokeStyle = stroke.erase ? "#000000aa" : (colour[stroke.target?.label || label] || "#ffffff") + "88";
      ctx.beginPath();
      stroke.points.forEach(([x, y], i) => (i ? ctx.lineTo(...toCanvas(x, y)) : ctx.moveTo(...toCanvas(x, y))));
      if (stroke.points.length === 1) ctx.lineTo(...toCanvas(...stroke.points[0]));
      ctx.stroke();
      ctx.restore();
    }
    if (pointer && (tool === "brush" || tool === "eraser")) {
      ctx.beginPath();
      ctx.arc(...toCanvas(pointer[0], pointer[1]), brush * view.s, 0, Math.PI * 2);
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 1;
      ctx.stroke();
    }
    renderList();
  }
  function renderList() {
    listEl.replaceChildren(
      ...img().shapes.map((s) => {
        const li = document.createElement("li");
        li.dataset.shape = s.id;
        li.className = s.id === selected ? "selected" : "";
        li.textContent = `${s.label} · ${s.type}${s.score !== undefined ? ` · pre ${s.score.toFixed(2)}` : ""}`;
        li.addEventListener("click", () => { selected = s.id; redraw(); renderAttributes(); });
        return li;
      }),
    );
    root.dataset.shapes = String(img().shapes.length);
  }
  function renderAttributes() {
    const s = img().shapes.find((x) => x.id === selected);
    attrsEl.replaceChildren();
    if (!s) return;
    const cls = schema.classes.find((c) => c.name === s.label);
    for (const a of cls?.attributes || []) {
      const row = document.createElement("label");
      row.append(Object.assign(document.createElement("span"), { textContent: a.name }));
      let input;
      if (a.kind === "select") {
        input = document.createElement("select");
        input.append(new Option("—", ""), ...a.values.map((v) => new Option(v, v, false, s.attributes?.[a.name] === v)));
      } else {
        input = document.createElement("input");
        input.type = a.kind === "checkbox" ? "checkbox" : a.kind === "number" ? "number" : "text";
        if (a.kind === "checkbox") input.checked = !!s.attributes?.[a.name];
        else input.value = s.attributes?.[a.name] ?? "";
      }
      input.name = a.name;
      input.addEventListener("change", () => {
        record();
        const value = a.kind === "checkbox" ? input.checked : a.kind === "number" ? Number(input.value) : input.value;
        s.attributes = { ...(s.attributes || {}) };
        if (value === "" || (a.kind === "checkbox" && !value)) delete s.attributes[a.name];
        else s.attributes[a.name] = value;
        if (!Object.keys(s.attributes).length) delete s.attributes;
        changed();
      });
      row.append(input);
      attrsEl.append(row);
    }
  }

  async function show(i) {
    draft = null;
    selected = null;
    current = i;
    const im = img();
    nameEl.textContent = `${im.position} / ${images.length}`;
    root.dataset.image = String(im.position);
    fit();
    if (!im.bitmap) {
      const el = new Image();
      el.src = `${slotPath}/images/${im.position}/file`;
      await el.decode().catch(() => setStatus(`image ${im.position} did not load`, "error"));
      im.bitmap = el;
    }
    redraw();
    renderAttributes();
  }

  // ---- editing ----
  function finishDraft() {
    if (!draft) return;
    const d = draft;
    draft = null;
    delete d.cursor;
    const ok = (d.type === "polygon" && d.points.length >= 3 && simple(d.points)) || (d.type === "polyline" && d.points.length >= 2) || (d.type === "points" && d.points.length >= 1) || d.type === "box";
    if (ok) {
      record();
      img().shapes.push(d);
      selected = d.id;
      changed();
    }
    redraw();
    renderAttributes();
  }
  function removeSelected() {
    if (!selected) return;
    record();
    img().shapes = img().shapes.filter((s) => s.id !== selected);
    selected = null;
    changed();
    redraw();
    renderAttributes();
  }
  function setLabel(name) {
    label = name;
    root.querySelectorAll("[data-label]").forEach((b) => b.classList.toggle("active", b.dataset.label === name));
    const s = img()?.shapes.find((x) => x.id === selected);
    if (s && s.label !== name) {
      record();
      s.label = name;
      delete s.score;
      delete s.attributes;
      changed();
      redraw();
      renderAttributes();
    }
  }
  function setTool(name) {
    finishDraft();
    tool = name;
    root.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === name));
  }
  // A pre-annotation the annotator keeps becomes theirs (its score goes).
  function accept(all) {
    const targets = img().shapes.filter((s) => s.score !== undefined && (all || s.id === selected));
    if (!targets.length) return;
    record();
    targets.forEach((s) => delete s.score);
    changed();
    redraw();
  }
  // The previous image's shapes, copied (new IDs), where they fit this image.
  function copyPrevious() {
    if (current === 0) return;
    const prev = images[current - 1], im = img();
    const fits = (s) =>
      s.type === "mask" ? s.rle.size[0] === im.height && s.rle.size[1] === im.width : vertices(s).every(([x, y]) => x >= 0 && y >= 0 && x <= im.width && y <= im.height);
    const copies = prev.shapes.filter(fits).map((s) => ({ ...clone(s), id: newId() }));
    if (!copies.length) return;
    record();
    im.shapes.push(...copies);
    changed();
    redraw();
  }

  // A brush stroke is painted into its mask (a new one, or the selected mask of the label); an
  // eraser stroke clears pixels of its mask, and a mask left empty goes.
  function commitStroke() {
    const st = stroke, im = img();
    stroke = null;
    // The image changed, or an undo took the mask away, while the button was held: dropped.
    if (!st || st.image !== im || (st.target && !im.shapes.includes(st.target))) return redraw();
    const { width, height } = im;
    const bitmap = (im.paint ||= new Uint8Array(width * height));
    let box = st.target ? Masks.bounds(st.target.rle) : null;
    if (st.target) Masks.forEachPixel(st.target.rle, (x, y) => (bitmap[y * width + x] = 1));
    st.points.forEach((p, i) => {
      const [x0, y0, x1, y1] = Masks.paintSegment(bitmap, width, height, st.points[Math.max(0, i - 1)], p, brush, st.erase ? 0 : 1);
      box = box ? [Math.min(box[0], x0), Math.min(box[1], y0), Math.max(box[2], x1), Math.max(box[3], y1)] : [x0, y0, x1, y1];
    });
    if (!box || box[2] <= box[0] || box[3] <= box[1]) return redraw();
    const rle = Masks.encode(bitmap, width, height, box);
    for (let y = box[1]; y < box[3]; y++) bitmap.fill(0, y * width + box[0], y * width + box[2]);
    const empty = rle.counts.length < 2;
    if (!st.target && empty) return redraw();
    record();
    if (st.target && empty) {
      im.shapes = im.shapes.filter((s) => s !== st.target);
      selected = null;
    } else if (st.target) {
      st.target.rle = rle;
      delete st.target.score;
    } else {
      const shape = { id: newId(), label, type: "mask", rle };
      im.shapes.push(shape);
      selected = shape.id;
    }
    changed();
    redraw();
    renderAttributes();
  }
  function setBrush(factor) {
    brush = Math.min(Math.max(Math.round(brush * factor * 4) / 4, 1), 200);
    root.dataset.brush = String(brush);
    if (images.length) redraw();
  }

  // A vertex on the last one (the second click of a double-click) is not a new vertex.
  function addVertex(d, x, y) {
    const last = d.points[d.points.length - 1];
    if (last && Math.hypot(last[0] - x, last[1] - y) * view.s < 2) return;
    d.points.push([round(x), round(y)]);
  }
  // Whether a polygon's edges meet only at shared vertices (the server refuses any other).
  function simple(points) {
    const n = points.length;
    const orient = (a, b, c) => Math.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]));
    const on = (a, b, c) => Math.min(a[0], b[0]) <= c[0] && c[0] <= Math.max(a[0], b[0]) && Math.min(a[1], b[1]) <= c[1] && c[1] <= Math.max(a[1], b[1]);
    const meet = (a, b, c, d) => {
      const [o1, o2, o3, o4] = [orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)];
      if (o1 * o2 < 0 && o3 * o4 < 0) return true;
      return (o1 === 0 && on(a, b, c)) || (o2 === 0 && on(a, b, d)) || (o3 === 0 && on(c, d, a)) || (o4 === 0 && on(c, d, b));
    };
    for (let i = 0; i < n; i++) {
      for (let j = i + 1; j < n; j++) {
        if (j === i + 1 || (i === 0 && j === n - 1)) continue;
        if (meet(points[i], points[(i + 1) % n], points[j], points[(j + 1) % n])) return false;
      }
    }
    return true;
  }

  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => {
    if (lost) return;
    touch();
    canvas.setPointerCapture(e.pointerId);
    const [sx, sy] = eventPoint(e);
    const [x, y] = toImage(sx, sy);
    if (e.button === 1 || e.button === 2 || e.shiftKey) {
      drag = { kind: "pan", sx, sy, ox: view.ox, oy: view.oy };
      return;
    }
    if (tool === "select") {
      const s0 = img().shapes.find((s) => s.id === selected);
      const h = s0 ? handleAt(s0, sx, sy) : -1;
      // Undo keeps the shapes as they were before the drag, taken now and recorded only if
      // something moves (a click that only selects leaves the redo history alone).
      if (s0 && h >= 0) {
        drag = { kind: "handle", shape: s0, index: h, before: clone(img().shapes), moved: false };
        return;
      }
      const hit = [...img().shapes].reverse().find((s) => inside(s, x, y));
      selected = hit ? hit.id : null;
      if (hit && hit.type !== "mask") drag = { kind: "move", shape: hit, from: [x, y], original: clone(hit), before: clone(img().shapes), moved: false };
      redraw();
      renderAttributes();
      return;
    }
    if (tool === "brush" || tool === "eraser") {
      const erase = tool === "eraser";
      const chosen = img().shapes.find((s) => s.id === selected && s.type === "mask" && (erase || s.label === label));
      const target = chosen || (erase ? [...img().shapes].reverse().find((s) => s.type === "mask" && inside(s, x, y)) : null);
      if (erase && !target) return;
      stroke = { erase, target, image: img(), points: [[round(x), round(y)]] };
      drag = { kind: "stroke" };
      redraw();
      return;
    }
    const [cx, cy] = [clampX(x), clampY(y)];
    if (tool === "box") {
      draft = { id: newId(), label, type: "box", x: cx, y: cy, w: 0, h: 0 };
      drag = { kind: "draw", from: [cx, cy] };
    } else if (tool === "polygon") {
      if (!draft) draft = { id: newId(), label, type: "polygon", points: [] };
      const first = draft.points[0];
      if (first && draft.points.length >= 3) {
        const [fx, fy] = toCanvas(first[0], first[1]);
        if (Math.hypot(fx - sx, fy - sy) <= CLOSE_PX) return finishDraft();
      }
      addVertex(draft, cx, cy);
    } else if (tool === "polyline") {
      if (!draft) draft = { id: newId(), label, type: "polyline", points: [] };
      addVertex(draft, cx, cy);
    } else if (tool === "points") {
      if (!draft) draft = { id: newId(), label, type: "points", points: [] };
      draft.points.push([round(cx), round(cy)]);
    }
    redraw();
  });
  canvas.addEventListener("pointermove", (e) => {
    const [sx, sy] = eventPoint(e);
    const [x, y] = toImage(sx, sy);
    if (draft && (draft.type === "polygon" || draft.type === "polyline")) draft.cursor = [clampX(x), clampY(y)];
    pointer = [x, y];
    if (!drag) {
      if (draft || tool === "brush" || tool === "eraser") redraw();
      return;
    }
    touch();
    if (drag.kind === "pan") {
      view.ox = drag.ox + sx - drag.sx;
      view.oy = drag.oy + sy - drag.sy;
    } else if (drag.kind === "stroke") {
      stroke.points.push([round(x), round(y)]);
    } else if (drag.kind === "draw") {
      draft.x = Math.min(drag.from[0], clampX(x));
      draft.y = Math.min(drag.from[1], clampY(y));
      draft.w = Math.abs(clampX(x) - drag.from[0]);
      draft.h = Math.abs(clampY(y) - drag.from[1]);
    } else if (drag.kind === "move") {
      const s = drag.shape, o = drag.original, im = img();
      let dx = x - drag.from[0], dy = y - drag.from[1];
      const [bx0, by0, bx1, by1] = vertices(o).reduce((b, [px, py]) => [Math.min(b[0], px), Math.min(b[1], py), Math.max(b[2], px), Math.max(b[3], py)], [Infinity, Infinity, -Infinity, -Infinity]);
      dx = Math.min(Math.max(dx, -bx0), im.width - bx1);
      dy = Math.min(Math.max(dy, -by0), im.height - by1);
      if (s.type === "box") { s.x = round(o.x + dx); s.y = round(o.y + dy); }
      else s.points = o.points.map(([px, py]) => [round(px + dx), round(py + dy)]);
      drag.moved = true;
    } else if (drag.kind === "handle") {
      const s = drag.shape, [cx, cy] = [round(clampX(x)), round(clampY(y))];
      if (s.type === "box") {
        const corners = vertices(s);
        const opposite = corners[(drag.index + 2) % 4];
        s.x = Math.min(opposite[0], cx); s.y = Math.min(opposite[1], cy);
        s.w = Math.abs(cx - opposite[0]); s.h = Math.abs(cy - opposite[1]);
        // The corner under the cursor now (it may have crossed the opposite one).
        const [left, top] = [cx < opposite[0], cy < opposite[1]];
        drag.index = top ? (left ? 0 : 1) : left ? 3 : 2;
      } else s.points[drag.index] = [cx, cy];
      drag.moved = true;
    }
    redraw();
  });
  canvas.addEventListener("pointerup", () => {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.kind === "stroke") return commitStroke();
    if (d.kind === "draw") {
      normalizeBox(draft);
      if (draft.w * view.s < 3 || draft.h * view.s < 3) draft = null;
      else finishDraft();
    } else if ((d.kind === "move" || d.kind === "handle") && d.moved) {
      const s = d.shape;
      if (s.type === "box") normalizeBox(s);
      const broken = (s.type === "box" && (s.w < 1 || s.h < 1)) || (s.type === "polygon" && !simple(s.points));
      if (broken) {
        // A box without area or a polygon crossing itself is not kept: back to before the drag.
        img().shapes = d.before;
        selected = null;
      } else {
        img().undo.push(d.before);
        img().redo = [];
        delete s.score;
        changed();
      }
    }
    redraw();
  });
  canvas.addEventListener("pointerleave", () => {
    pointer = null;
    if (tool === "brush" || tool === "eraser") redraw();
  });
  canvas.addEventListener("dblclick", () => draft && finishDraft());
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [sx, sy] = eventPoint(e);
    zoomAt(sx, sy, e.deltaY < 0 ? 1.25 : 0.8);
  }, { passive: false });
  function zoomAt(sx, sy, factor) {
    const [x, y] = toImage(sx, sy);
    view.s = Math.min(Math.max(view.s * factor, 0.02), 32);
    view.ox = sx - x * view.s;
    view.oy = sy - y * view.s;
    redraw();
  }

  async function go(delta) {
    const next = current + delta;
    if (next < 0 || next >= images.length) return;
    finishDraft();
    saveImage(current);
    await show(next);
  }

  async function submitTask() {
    finishDraft();
    clearTimeout(saveTimer);
    await Promise.all(images.map((_, i) => saveImage(i)));
    if (images.some((x) => x.dirty) || lost) return;
    try {
      await api("POST", `${slotPath}/submit`);
      setStatus("submitted", "submitted");
      lock("submitted");
      root.dataset.submitted = "1";
    } catch (e) {
      setStatus(`not submitted: ${e.message}`, "error");
    }
  }

  const keys = {
    b: () => setTool("box"), p: () => setTool("polygon"), l: () => setTool("polyline"), k: () => setTool("points"), v: () => setTool("select"),
    m: () => setTool("brush"), e: () => setTool("eraser"), "[": () => setBrush(0.8), "]": () => setBrush(1.25),
    Enter: finishDraft, Escape: () => { draft = null; redraw(); }, Delete: removeSelected, Backspace: removeSelected,
    n: () => go(1), ArrowRight: () => go(1), ArrowLeft: () => go(-1), c: copyPrevious,
    a: () => accept(true), f: () => { fit(); redraw(); }, "+": () => zoomAt(canvas.width / 2, canvas.height / 2, 1.25), "-": () => zoomAt(canvas.width / 2, canvas.height / 2, 0.8),
  };
  const VIEW_KEYS = new Set(["n", "ArrowRight", "ArrowLeft", "f", "+", "-", "Escape"]);
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
    // A task that is no longer this page's to change can still be looked at.
    if (lost && !VIEW_KEYS.has(e.key)) return;
    touch();
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") { e.preventDefault(); return e.shiftKey ? redoIt() : undo(); }
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "y") { e.preventDefault(); return redoIt(); }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const digit = Number(e.key);
    if (digit >= 1 && digit <= schema.classes.length) return setLabel(schema.classes[digit - 1].name);
    const action = keys[e.key];
    if (action) { e.preventDefault(); action(); }
  });
  root.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    if (lost && !["prev", "next", "fit"].includes(b.dataset.action)) return;
    if (b.dataset.tool) setTool(b.dataset.tool);
    else if (b.dataset.label) setLabel(b.dataset.label);
    else ({ undo, redo: redoIt, prev: () => go(-1), next: () => go(1), copy: copyPrevious, accept: () => accept(true), fit: () => { fit(); redraw(); }, submit: submitTask, delete: removeSelected })[b.dataset.action]?.();
  });

  // For tests and scripts: where an image point is on the screen (viewport pixels).
  // And how long a full redraw takes (the mean of `n`), for the page's benchmark.
  window.suanliAnnotator = {
    toViewport(x, y) {
      const r = canvas.getBoundingClientRect();
      const [cx, cy] = toCanvas(x, y);
      return [r.left + cx, r.top + cy];
    },
    timeRedraws(n) {
      const start = performance.now();
      for (let i = 0; i < n; i++) redraw();
      ctx.getImageData(0, 0, 1, 1);
      return (performance.now() - start) / n;
    },
  };

  setTool(schema.kinds.includes("box") ? "box" : "select");
  setBrush(1);
  setLabel(label);
  load().catch((e) => setStatus(`could not load the task: ${e.message}`, "error"));
})();

// "Annotate the next task": takes a slot and opens the tool on it.
(() => {
  const button = document.querySelector("[data-next-task]");
  if (!button) return;
  const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";
  button.addEventListener("click", async () => {
    const project = button.dataset.nextTask;
    const problem = button.parentElement.querySelector(".form-error");
    const r = await fetch(`/api/v1/annotation-projects/${project}/next`, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf(), Accept: "application/json" } });
    const body = await r.json();
    if (r.ok) location.href = `/annotation/${project}/tasks/${body.task}/slots/${body.slot}`;
    else problem.textContent = r.status === 404 ? problem.dataset.nothingLeft : body.error?.message || r.statusText;
  });
})();

// The reviewer's conflicts: each drawn over its image, each member shape with "accept", the
// object with "reject".
(() => {
  const root = document.getElementById("review");
  if (!root) return;
  const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";
  const base = `/api/v1/annotation-projects/${root.dataset.project}`;
  const list = root.querySelector(".conflicts");
  const palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];

  function draw(canvas, image, bitmap, shapes) {
    const s = Math.min(1, 360 / image.width);
    canvas.width = Math.round(image.width * s);
    canvas.height = Math.round(image.height * s);
    const ctx = canvas.getContext("2d");
    if (bitmap) ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    shapes.forEach((shape, i) => {
      ctx.strokeStyle = palette[i % palette.length];
      ctx.lineWidth = 2;
      if (shape.type === "mask") {
        const pic = Masks.picture(shape.rle, palette[i % palette.length]);
        if (!pic) return;
        const [x0, y0, x1, y1] = pic.box;
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(pic.canvas, x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
        ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
        return;
      }
      ctx.beginPath();
      if (shape.type === "box") ctx.rect(shape.x * s, shape.y * s, shape.w * s, shape.h * s);
      else {
        shape.points.forEach(([x, y], k) => (k ? ctx.lineTo(x * s, y * s) : ctx.moveTo(x * s, y * s)));
        if (shape.type === "polygon") ctx.closePath();
      }
      ctx.stroke();
    });
  }

  async function decide(image, key, decision) {
    const r = await fetch(`${base}/images/${image}/decisions`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify({ key, decision }),
    });
    if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
    await load();
  }

  async function load() {
    const r = await fetch(`${base}/conflicts`, { credentials: "same-origin", headers: { Accept: "application/json" } });
    const images = r.ok ? await r.json() : [];
    list.replaceChildren();
    if (!images.length) list.append(Object.assign(document.createElement("p"), { className: "none", textContent: root.dataset.none }));
    for (const image of images) {
      const bitmap = new Image();
      bitmap.src = `${base}/images/${image.image_no}/file`;
      await bitmap.decode().catch(() => {});
      for (const c of image.conflicts.filter((x) => !x.decision)) {
        const item = document.createElement("article");
        item.className = "conflict";
        item.dataset.key = c.key;
        item.dataset.image = image.image_no;
        const canvas = document.createElement("canvas");
        draw(canvas, image, bitmap, c.shapes.map((m) => m.shape));
        const why = [c.missing.length ? `${root.dataset.missing} ${c.missing.join(", ")}` : "", c.labels_differ ? root.dataset.labelsDiffer : ""].filter(Boolean).join(" · ");
        item.append(Object.assign(document.createElement("h3"), { textContent: `${image.name}: ${why}` }), canvas);
        const problem = Object.assign(document.createElement("p"), { className: "form-error" });
        const act = (decision) => decide(image.image_no, c.key, decision).catch((e) => (problem.textContent = e.message));
        c.shapes.forEach((m, i) => {
          const b = Object.assign(document.createElement("button"), { type: "button", textContent: `${root.dataset.accept} ${m.annotator}: ${m.shape.label} (${m.shape.type})` });
          b.style.borderColor = palette[i % palette.length];
          b.dataset.accept = m.annotator;
          b.addEventListener("click", () => act({ decision: "accept", annotator: m.annotator, shape: m.shape.id }));
          item.append(b);
        });
        const reject = Object.assign(document.createElement("button"), { type: "button", textContent: root.dataset.reject });
        reject.dataset.reject = "1";
        reject.addEventListener("click", () => act({ decision: "reject" }));
        item.append(reject, problem);
        list.append(item);
      }
    }
    root.dataset.loaded = String(Date.now());
  }
  load();
})();
