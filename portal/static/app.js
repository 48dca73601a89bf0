// Suanli portal: submits `form.api` as JSON to the REST API, shows each field's problem beside
// it, and plots live monitoring. Plain JavaScript, no build step.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

// The portal's own row IDs (a dataset's, say) are random 63-bit numbers: more than a JavaScript
// number holds exactly. An integer too large to be exact is kept as its digits.
const parseJson = (text) =>
  JSON.parse(text, (_, v, context) => (typeof v === "number" && !Number.isSafeInteger(v) && /^-?\d+$/.test(context?.source || "") ? context.source : v));

function setPath(obj, path, value) {
  const keys = path.split(".");
  let o = obj;
  for (const k of keys.slice(0, -1)) o = o[k] ??= {};
  o[keys[keys.length - 1]] = value;
}

async function readFile(input) {
  const file = input.files && input.files[0];
  if (!file) return null;
  const buf = new Uint8Array(await file.arrayBuffer());
  let bin = "";
  for (let i = 0; i < buf.length; i += 0x8000) bin += String.fromCharCode.apply(null, buf.subarray(i, i + 0x8000));
  return { name: file.name, base64: btoa(bin) };
}

async function formBody(form) {
  const body = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled) continue;
    const type = el.dataset.type;
    if (el.type === "checkbox") {
      if (type === "bool") setPath(body, el.name, el.checked);
      else if (el.checked) {
        const list = body[el.name] ??= [];
        list.push(type === "number-list" ? Number(el.value) : el.value);
      } else if (type === "number-list" || type === "list") body[el.name] ??= [];
      continue;
    }
    if (type === "file-base64") {
      const f = await readFile(el);
      if (f) { body.licence_base64 = f.base64; body.licence_filename = f.name; }
      continue;
    }
    const v = el.value;
    if (el.name.startsWith("price.")) {
      if (v.trim() === "") continue;
      // Prices (in yuan on the page, fen on the wire) belong to the listing: nested when
      // publishing, the body itself when modifying (data-prices="top").
      const listing = form.dataset.prices === "top" ? body : (body.listing ??= {});
      (listing.prices ??= []).push({ billing_mode: el.name.slice(6), per_card_minor: Math.round(Number(v) * 100) });
      continue;
    }
    if (v === "" && el.type !== "hidden") continue;
    if (type === "number") setPath(body, el.name, Number(v));
    else if (type === "yuan") setPath(body, el.name, Math.round(Number(v) * 100));
    else if (type === "bool-value") setPath(body, el.name, v === "true");
    else setPath(body, el.name, v);
  }
  if (body.listing && !body.listing.prices) body.listing.prices = [];
  if (form.dataset.prices === "top" && !body.prices) body.prices = [];
  return body;
}

function showProblems(form, error) {
  form.querySelector(".form-error").textContent = error.message || error.code;
  for (const f of error.fields || []) {
    const name = f.field.replace(/^listing\./, "");
    const slot = form.querySelector(`.problem[data-for="${f.field}"]`) || form.querySelector(`.problem[data-for="listing.${name}"]`) || form.querySelector(`.problem[data-for="${name}"]`);
    if (slot) slot.textContent = f.problem;
  }
}

async function submit(form, ev) {
  ev.preventDefault();
  form.querySelectorAll(".problem").forEach((p) => (p.textContent = ""));
  form.querySelector(".form-error").textContent = "";
  const method = form.dataset.method || "POST";
  const body = await formBody(form);
  // `{field}` in the address comes from the form (a share names its user in the path).
  const api = form.dataset.api.replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(body[k] ?? ""));
  const res = await fetch(api, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  const data = text ? parseJson(text) : {};
  if (!res.ok) return showProblems(form, data.error || { message: res.statusText });
  if (data.mfa_required) {
    form.querySelector(".form-error").textContent = "2FA";
    form.dataset.api = "/api/v1/session/totp";
    document.querySelector('meta[name="csrf-token"]').content = data.csrf_token;
    const code = form.querySelector('[name="totp_code"]');
    if (code) { code.name = "code"; code.focus(); }
    return;
  }
  document.querySelectorAll(`[data-after="${form.dataset.api}"]`).forEach((e) => e.classList.remove("hidden"));
  if (form.dataset.show) {
    const out = form.querySelector("output.result");
    out.textContent = form.dataset.show.split(",").map((k) => data[k]).filter((v) => v !== undefined && v !== null).join("\n");
    out.classList.add("shown");
    return;
  }
  if (form.dataset.next) {
    location.href = form.dataset.next.replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(data[k]));
  }
}

// Draws `values` in a figure's polyline: from 0 to data-max (or the largest value), or, with
// data-range="auto" (a job's curves), from the smallest value to the largest.
function plot(fig, values) {
  const auto = fig.dataset.range === "auto";
  // Folded, not spread: a long run's curve has more points than a call takes arguments.
  const top = values.reduce((a, b) => Math.max(a, b), -Infinity);
  const max = auto ? top : Math.max(Number(fig.dataset.max) || 1, top);
  const min = auto ? values.reduce((a, b) => Math.min(a, b), Infinity) : 0;
  const span = max - min || 1;
  const n = values.length;
  const pts = values.map((v, i) => `${((i / Math.max(n - 1, 1)) * 360).toFixed(1)},${(115 - ((v - min) / span) * 110).toFixed(1)}`);
  fig.querySelector("polyline").setAttribute("points", pts.join(" "));
  fig.querySelector("strong").textContent = n ? values[n - 1].toFixed(Number(fig.dataset.digits) || 1) : "—";
}

function live(section) {
  const series = { cpu: [], net: [], rtt: [], loss: [], gpu: [], temp: [] };
  const lastNet = {};
  const es = new EventSource(section.dataset.live);
  es.addEventListener("sample", (ev) => {
    const s = JSON.parse(ev.data);
    const prev = lastNet[s.node_id];
    lastNet[s.node_id] = s;
    const push = (k, v) => { series[k].push(v); if (series[k].length > 120) series[k].shift(); };
    push("cpu", s.cpu_utilization_pct);
    push("rtt", s.rtt_ms);
    push("loss", s.packet_loss_permille);
    if (prev && s.at_ms > prev.at_ms) {
      push("net", ((s.net_rx_bytes + s.net_tx_bytes - prev.net_rx_bytes - prev.net_tx_bytes) / 1024) / ((s.at_ms - prev.at_ms) / 1000));
    }
    const present = s.cards.filter((c) => c.present);
    if (present.length) {
      push("gpu", present.reduce((a, c) => a + c.gpu_utilization_pct, 0) / present.length);
      push("temp", present.reduce((a, c) => a + c.temperature_c, 0) / present.length);
    }
    section.querySelectorAll("figure[data-series]").forEach((f) => plot(f, series[f.dataset.series]));
  });
}

// A job's output: read from where the last read got to, waiting for more while it runs, and
// on into the job's next attempt; a portal briefly away is asked again.
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
async function followLog(pre) {
  const jobUrl = pre.dataset.jobLog.replace(/\/log$/, "");
  const get = async (url) => {
    for (let tries = 0; ; tries++) {
      const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (res.ok) return res.json();
      if (res.status < 500 || tries >= 30) throw new Error(String(res.status));
      await pause(2000);
    }
  };
  let from = 0;
  let attempt = 0;
  for (;;) {
    const wait = pre.dataset.live === "true" ? 10000 : 0;
    const piece = await get(`${pre.dataset.jobLog}?from=${from}&wait_ms=${wait}` + (attempt ? `&attempt=${attempt}` : ""));
    if (piece.from > from) pre.append(`[… ${piece.from - from} bytes no longer held]\n`);
    pre.append(piece.text);
    if (piece.text) pre.scrollTop = pre.scrollHeight;
    attempt = piece.attempt;
    from = piece.next;
    if (piece.text && !piece.ended) continue;
    if (wait === 0 && (piece.ended || !piece.text)) { pre.dataset.ended = "true"; return; }
    if (!piece.ended) continue;
    const job = await get(jobUrl);
    const latest = job.attempts.length ? job.attempts[job.attempts.length - 1].number : 0;
    if (latest > attempt) {
      pre.append(`[attempt ${latest}]\n`);
      attempt = latest;
      from = 0;
    } else if (["succeeded", "failed", "cancelled"].includes(job.state)) {
      pre.dataset.ended = "true";
      return;
    } else {
      await pause(2000); // the next attempt is not placed yet
    }
  }
}

// The page's `data-refresh` blocks, read again and replaced (a block the page lacks goes after
// the one before it); the forms among them work as the page's own.
async function refresh() {
  const res = await fetch(location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } });
  if (!res.ok) return;
  const fresh = new DOMParser().parseFromString(await res.text(), "text/html");
  let previous = null;
  for (const n of fresh.querySelectorAll("[data-refresh]")) {
    const node = document.importNode(n, true);
    const old = document.querySelector(`[data-refresh="${n.dataset.refresh}"]`);
    if (old) old.replaceWith(node);
    else if (previous) previous.after(node);
    else continue;
    previous = node;
    node.querySelectorAll("form.api").forEach(bindForm);
  }
}

// A job's curves, redrawn while it runs, and once more after its output has ended.
async function followCurves(section, live) {
  for (;;) {
    // Read before the fetch: the fetch after the output's end draws its last points.
    const over = !live || document.querySelector("pre[data-job-log]")?.dataset.ended === "true";
    const res = await fetch(section.dataset.curves, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (res.ok) {
      const curves = await res.json();
      for (const [name, points] of Object.entries(curves.series)) {
        let fig = [...section.querySelectorAll("figure[data-curve]")].find((f) => f.dataset.curve === name);
        if (!fig) {
          fig = document.createElement("figure");
          fig.className = "chart";
          fig.dataset.curve = name;
          fig.dataset.range = "auto";
          fig.dataset.digits = "4";
          fig.innerHTML = '<figcaption><span></span>: <strong></strong></figcaption><svg viewBox="0 0 360 120" preserveAspectRatio="none" role="img"><polyline points="" fill="none" stroke="currentColor" stroke-width="2"></polyline></svg>';
          fig.querySelector("span").textContent = name;
          section.append(fig);
        }
        plot(fig, points.map((p) => p[1]));
      }
    }
    if (over) return;
    await pause(5000);
  }
}

// ---- Dataset uploads: tus 1.0.0 from the browser ----
// Each chosen file is hashed (SHA-256 of the whole file), created as an upload and sent in
// 1 MiB PATCHes with XMLHttpRequest, so progress shows and Pause aborts the piece under way (the
// portal keeps what arrived). Resume, and any PATCH that fails, asks the portal (HEAD) where the
// upload got to and goes on from there. Each upload's address is kept in localStorage under the
// file's name, size, time and hash: choosing the same file after a reload resumes it. Once every
// file is complete, one POST makes the new version from all of them.
// Each file's row says where it is for people and for tests: data-state (queued, hashing,
// uploading, paused, done, failed; skipped: an empty file), data-offset (bytes the portal has),
// data-length, data-upload (its address) and data-resumed-from (where this page's first PATCH
// of it started).

const CHUNK = 1 << 20;
const PARALLEL = 3;

class PortalError extends Error {
  constructor(code, message, status) {
    super(`${code}: ${message}`);
    this.code = code;
    this.status = status;
  }
}

function errorFrom(status, statusText, text) {
  let error = null;
  try { error = parseJson(text).error; } catch (_) { /* not the portal's JSON */ }
  return new PortalError(error?.code || `HTTP_${status}`, error?.message || statusText || text || "no answer", status);
}

async function portalError(res) {
  return errorFrom(res.status, res.statusText, await res.text().catch(() => ""));
}

function base64Utf8(text) {
  let bin = "";
  for (const b of new TextEncoder().encode(text)) bin += String.fromCharCode(b);
  return btoa(bin);
}

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The names files are sent under: the path inside what was chosen, without the one top-level
// folder every chosen file shares (`digits/zero/a.png` → `zero/a.png`, class `zero`); a file
// chosen on its own keeps its name.
function uploadNames(paths) {
  const tops = new Set(paths.map((p) => (p.includes("/") ? p.split("/")[0] : "")));
  const [top] = tops;
  const common = tops.size === 1 && top ? top : null;
  return paths.map((p) => (common ? p.slice(common.length + 1) : p));
}

// Files and folders dropped: every file under them, with its path. The entries are taken at
// once (the drop's items are gone after the event).
function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  const plain = [...dataTransfer.files].map((f) => ({ file: f, path: f.name }));
  if (!entries.length) return Promise.resolve(plain);
  const out = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((ok, fail) => entry.file(ok, fail));
      out.push({ file, path: entry.fullPath.replace(/^\/+/, "") });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  };
  return (async () => {
    for (const e of entries) await walk(e);
    return out;
  })();
}

const uploadKey = (item) => "suanli-upload:" + JSON.stringify([item.name, item.file.size, item.file.lastModified, item.sha256]);

// Bytes of an upload the portal has (tus HEAD).
async function uploadOffset(url) {
  const res = await fetch(url, { method: "HEAD", credentials: "same-origin", cache: "no-store", headers: { "Tus-Resumable": "1.0.0" } });
  if (!res.ok) throw new PortalError(res.status === 404 ? "NOT_FOUND" : `HTTP_${res.status}`, `upload ${url}`, res.status);
  const at = res.headers.get("Upload-Offset");
  if (at === null) throw new PortalError("PROTOCOL", "no Upload-Offset in the answer", res.status);
  return Number(at);
}

async function createUpload(item) {
  const res = await fetch("/api/v1/uploads", {
    method: "POST",
    credentials: "same-origin",
    headers: {
      "Tus-Resumable": "1.0.0",
      "Upload-Length": String(item.file.size),
      "Upload-Metadata": `filename ${base64Utf8(item.name)},sha256 ${btoa(item.sha256)}`,
      "X-CSRF-Token": csrf(),
      Accept: "application/json",
    },
  });
  if (res.status !== 201) throw await portalError(res);
  return res.headers.get("Location") || `/api/v1/uploads/${(await res.json()).upload_id}`;
}

// One PATCH of up to CHUNK bytes from `offset`; the offset the portal answers with.
function patchUpload(item, offset, onProgress) {
  const end = Math.min(offset + CHUNK, item.file.size);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    item.xhr = xhr;
    xhr.open("PATCH", item.url);
    xhr.setRequestHeader("Tus-Resumable", "1.0.0");
    xhr.setRequestHeader("Content-Type", "application/offset+octet-stream");
    xhr.setRequestHeader("Upload-Offset", String(offset));
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    xhr.upload.onprogress = (e) => onProgress(offset + e.loaded);
    xhr.onload = () => {
      item.xhr = null;
      const at = xhr.getResponseHeader("Upload-Offset");
      if (xhr.status === 204 && at !== null) resolve(Number(at));
      else reject(errorFrom(xhr.status, xhr.statusText, xhr.responseText));
    };
    xhr.onerror = xhr.onabort = xhr.ontimeout = () => {
      item.xhr = null;
      reject(new Error("the PATCH did not finish"));
    };
    xhr.send(item.file.slice(offset, end));
  });
}

function uploader(section) {
  const messages = JSON.parse(section.dataset.messages || "{}");
  const say = (k) => messages[k] || k;
  const tbody = section.querySelector("table.upload-files tbody");
  const problem = section.querySelector(".form-error");
  const result = section.querySelector("output.upload-result");
  const button = (name) => section.querySelector(`button[data-upload="${name}"]`);
  const inputs = [...section.querySelectorAll("input[type=file]")];
  let chosen = [];
  let running = false;
  let paused = false;
  let wake = [];

  const controls = () => {
    button("start").disabled = running;
    button("pause").disabled = !running || paused;
    button("resume").disabled = !paused;
    inputs.forEach((i) => (i.disabled = running));
  };

  // Shows what the portal has; `sent` also counts the bytes of the PATCH under way.
  const show = (item, sent = item.offset) => {
    const r = item.row;
    r.dataset.offset = item.offset;
    r.dataset.sent = sent;
    const bar = r.querySelector("progress");
    bar.max = item.file.size;
    bar.value = sent;
    r.querySelector(".bytes").textContent = `${sent} / ${item.file.size} (${item.file.size ? Math.floor((sent / item.file.size) * 100) : 100}%)`;
  };
  const set = (item, state, error) => {
    item.state = state;
    item.row.dataset.state = state;
    item.row.querySelector(".state").textContent = error ? `${say(state)} — ${error}` : say(state);
    if (error) item.row.dataset.error = error;
    else delete item.row.dataset.error;
  };

  function choose(list) {
    if (running) return;
    if (chosen.length === 0) tbody.replaceChildren();
    result.replaceChildren();
    problem.textContent = "";
    const known = new Set(chosen.map((c) => c.path));
    for (const { file, path } of list) {
      if (known.has(path)) continue;
      known.add(path);
      const row = document.createElement("tr");
      row.className = "upload-file";
      row.innerHTML = '<td class="name"></td><td class="size"></td><td class="state"></td><td><progress value="0"></progress> <span class="bytes"></span></td>';
      tbody.append(row);
      chosen.push({ file, path, row, offset: 0, url: null });
    }
    const names = uploadNames(chosen.map((c) => c.path));
    chosen.forEach((item, i) => {
      if (item.name !== names[i]) {
        // Another name is another upload.
        item.name = names[i];
        item.url = null;
        item.offset = 0;
        // The portal takes no empty upload (and would reject an empty picture anyway).
        if (item.file.size === 0) set(item, "skipped", say("empty"));
        else set(item, "queued");
      }
      item.row.dataset.name = item.name;
      item.row.dataset.length = item.file.size;
      item.row.querySelector(".name").textContent = item.name;
      item.row.querySelector(".size").textContent = String(item.file.size);
      show(item);
    });
  }

  async function untilResumed(item) {
    while (paused) {
      set(item, "paused");
      await new Promise((r) => wake.push(r));
    }
  }

  async function send(item) {
    try {
      set(item, "hashing");
      item.sha256 ??= await sha256Hex(item.file);
      await untilResumed(item);
      set(item, "uploading");
      const key = uploadKey(item);
      item.url ??= localStorage.getItem(key);
      let ask = Boolean(item.url);
      if (!ask) {
        item.url = await createUpload(item);
        item.offset = 0;
        localStorage.setItem(key, item.url);
      }
      item.row.dataset.upload = item.url;
      let failures = 0;
      for (;;) {
        await untilResumed(item);
        set(item, "uploading");
        try {
          if (ask) {
            item.offset = await uploadOffset(item.url);
            ask = false;
            show(item);
          }
          if (item.row.dataset.resumedFrom === undefined) item.row.dataset.resumedFrom = item.offset;
          if (item.offset >= item.file.size) break;
          item.offset = await patchUpload(item, item.offset, (sent) => show(item, sent));
          failures = 0;
          show(item);
        } catch (e) {
          // The portal refused outright (a wrong hash, an upload gone, a quota): no retry.
          if (e instanceof PortalError && e.status !== 409 && e.status < 500) throw e;
          ask = true;
          if (!paused) {
            failures += 1;
            if (failures > 8) throw e;
            await pause(Math.min(250 * 2 ** failures, 8000));
          }
        }
      }
      set(item, "done");
    } catch (e) {
      if (e instanceof PortalError && (e.status === 404 || e.status === 460) && item.sha256) {
        // Gone (used, or deleted for a wrong hash): forget it; a missing one starts over once.
        localStorage.removeItem(uploadKey(item));
        item.url = null;
        item.offset = 0;
        if (e.status === 404 && !item.restarted) {
          item.restarted = true;
          return send(item);
        }
      }
      set(item, "failed", e.message || String(e));
    }
  }

  function showVersion(v, created) {
    result.replaceChildren();
    result.dataset.version = v.version;
    result.dataset.items = v.items;
    result.dataset.rejected = (v.rejected || []).length;
    const head = document.createElement("p");
    head.textContent = created
      ? `${say("new_version")} v${v.version}: ${v.items} ${say("items")} · ${say("added")} ${v.added} · ${say("removed")} ${v.removed} · ${say("modified")} ${v.modified} · ${say("duplicates")} ${v.duplicates}`
      : `${say("nothing_changed")} v${v.version}`;
    result.append(head);
    if (v.rejected && v.rejected.length) {
      const title = document.createElement("p");
      title.textContent = `${say("rejected")}: ${v.rejected.length}`;
      const list = document.createElement("ul");
      list.className = "rejected";
      for (const r of v.rejected) {
        const li = document.createElement("li");
        li.dataset.name = r.name;
        li.dataset.kind = r.kind;
        const name = document.createElement("strong");
        name.textContent = r.name;
        // Reasons tend to start with the name already.
        li.append(name, ` — ${r.reason.startsWith(`${r.name}: `) ? r.reason.slice(r.name.length + 2) : r.reason}`);
        list.append(li);
      }
      result.append(title, list);
    }
    result.classList.add("shown");
  }

  async function commit(sent) {
    result.textContent = say("committing");
    const uploads = sent.map((c) => c.url.split("/").pop());
    // The same uploads make the same request: a retry gets the version the first try made.
    const requestId = "web-" + (await sha256Hex(new Blob([uploads.slice().sort().join(",")]))).slice(0, 40);
    const body = {
      uploads,
      message: section.querySelector("[name=message]").value,
      labels: section.querySelector("[name=labels_from_folders]").checked ? "folders" : "none",
      request_id: requestId,
    };
    const res = await fetch(`/api/v1/datasets/${section.dataset.dataset}/versions`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body),
    });
    if (!res.ok) {
      result.textContent = "";
      problem.textContent = (await portalError(res)).message;
      return;
    }
    const version = parseJson(await res.text());
    for (const c of sent) localStorage.removeItem(uploadKey(c));
    chosen = [];
    inputs.forEach((i) => (i.value = ""));
    showVersion(version, res.status === 201);
    // The page's versions, labels, pictures and rejected files, read again.
    await refresh();
  }

  async function start() {
    if (running) return;
    problem.textContent = "";
    const sending = chosen.filter((c) => c.state !== "skipped");
    if (!sending.length) {
      problem.textContent = say("choose_first");
      return;
    }
    const most = Number(section.dataset.maxFiles) || Infinity;
    if (sending.length > most) {
      problem.textContent = `${say("too_many")} ${sending.length} / ${most}`;
      return;
    }
    running = true;
    paused = false;
    controls();
    try {
      const todo = sending.filter((c) => c.state !== "done");
      let next = 0;
      const worker = async () => {
        while (next < todo.length) await send(todo[next++]);
      };
      await Promise.all(Array.from({ length: Math.min(PARALLEL, todo.length) }, worker));
    } finally {
      running = false;
      paused = false;
      controls();
    }
    if (sending.every((c) => c.state === "done")) await commit(sending);
    else problem.textContent = say("some_failed");
  }

  function stop() {
    if (!running || paused) return;
    paused = true;
    for (const c of chosen) {
      if (c.xhr) c.xhr.abort();
      if (c.state === "uploading") set(c, "paused");
    }
    controls();
  }

  function go() {
    if (!paused) return;
    paused = false;
    const waiting = wake;
    wake = [];
    waiting.forEach((r) => r());
    controls();
  }

  for (const input of inputs) {
    input.addEventListener("change", () => choose([...input.files].map((f) => ({ file: f, path: f.webkitRelativePath || f.name }))));
  }
  const zone = section.querySelector(".dropzone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (running) return;
    droppedFiles(e.dataTransfer).then(choose).catch((err) => (problem.textContent = String(err)));
  });
  const fail = (e) => (problem.textContent = e.message || String(e));
  button("start").addEventListener("click", () => start().catch(fail));
  button("pause").addEventListener("click", stop);
  button("resume").addEventListener("click", go);
  controls();
}

// Two versions of a model side by side (GET …/compare?a=&b=).
async function compare(form, ev) {
  ev.preventDefault();
  const problem = form.querySelector(".form-error");
  problem.textContent = "";
  const table = form.querySelector("table.comparison");
  const query = new URLSearchParams({ a: form.querySelector("[name=a]").value, b: form.querySelector("[name=b]").value });
  const res = await fetch(`${form.dataset.api}?${query}`, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!res.ok) {
    problem.textContent = (await portalError(res)).message;
    return;
  }
  const c = await res.json();
  table.querySelector("th.a").textContent = `v${c.a.version}`;
  table.querySelector("th.b").textContent = `v${c.b.version}`;
  const number = (x) => (x === null || x === undefined ? "—" : String(Number(x.toFixed(6))));
  const rows = c.metrics.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.metric = m.metric;
    const delta = m.delta === null || m.delta === undefined ? "—" : (m.delta > 0 ? "+" : "") + number(m.delta);
    for (const text of [m.metric, number(m.a), number(m.b), delta]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  });
  table.querySelector("tbody").replaceChildren(...rows);
  table.classList.remove("hidden");
}

function bindForm(f) {
  f.addEventListener("submit", (ev) => submit(f, ev).catch((e) => (f.querySelector(".form-error").textContent = String(e))));
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form.api").forEach(bindForm);
  document.querySelectorAll("[data-logout]").forEach((b) =>
    b.addEventListener("click", async () => {
      await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } });
      location.href = "/";
    })
  );
  document.querySelectorAll("section[data-live]").forEach(live);
  // Once a running job's output has ended, its state, attempts and files are read again.
  document.querySelectorAll("pre[data-job-log]").forEach((p) =>
    followLog(p)
      .then(() => (p.dataset.live === "true" ? refresh() : undefined))
      .catch((e) => (p.dataset.error = String(e)))
  );
  document.querySelectorAll("section[data-curves]").forEach((s) => followCurves(s, document.querySelector("pre[data-job-log]")?.dataset.live === "true"));
  document.querySelectorAll("section.upload[data-dataset]").forEach(uploader);
  document.querySelectorAll("form.compare").forEach((f) => f.addEventListener("submit", (ev) => compare(f, ev).catch((e) => (f.querySelector(".form-error").textContent = String(e)))));
});

// Similar-image search (pages/data.rs, image_search_page): the chosen picture is drawn on a
// canvas, a drag over it selects the part to search by, and what is sent is that part,
// re-encoded as PNG in the browser; the original never leaves the machine uncropped.
function imageSearch(section) {
  const form = section.querySelector("form.query");
  const canvas = section.querySelector("canvas.crop");
  const ctx = canvas.getContext("2d");
  let picture = null;
  let crop = null;
  const draw = () => {
    ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
    if (!crop) return;
    ctx.strokeStyle = "#e4572e";
    ctx.lineWidth = 2;
    ctx.strokeRect(crop.x, crop.y, crop.w, crop.h);
  };
  form.elements.image.addEventListener("change", async () => {
    const file = form.elements.image.files[0];
    if (!file) return;
    picture = await createImageBitmap(file);
    const scale = Math.min(1, 480 / picture.width);
    canvas.width = Math.round(picture.width * scale);
    canvas.height = Math.round(picture.height * scale);
    canvas.hidden = false;
    crop = null;
    draw();
  });
  let start = null;
  canvas.addEventListener("pointerdown", (e) => { start = { x: e.offsetX, y: e.offsetY }; crop = null; });
  canvas.addEventListener("pointermove", (e) => {
    if (!start) return;
    crop = { x: Math.min(start.x, e.offsetX), y: Math.min(start.y, e.offsetY), w: Math.abs(e.offsetX - start.x), h: Math.abs(e.offsetY - start.y) };
    draw();
  });
  canvas.addEventListener("pointerup", () => { start = null; if (crop && (crop.w < 8 || crop.h < 8)) { crop = null; draw(); } });
  const query = () => {
    const p = new URLSearchParams({ library: form.elements.library.value, top: form.elements.top.value || "20" });
    if (form.elements.dataset.value) p.set("dataset", form.elements.dataset.value);
    if (form.elements.label.value.trim()) p.set("label", form.elements.label.value.trim());
    return p;
  };
  const show = async (res) => {
    const data = parseJson(await res.text());
    const error = form.querySelector(".form-error");
    if (!res.ok) { error.textContent = `${data.error?.code}: ${data.error?.message}`; return; }
    error.textContent = "";
    section.querySelector("p.took").textContent = `${data.results.length} · ${data.took_ms.toFixed(0)} ms`;
    const list = section.querySelector("ol.results");
    list.replaceChildren(...data.results.map((hit) => {
      const li = document.createElement("li");
      li.dataset.sha256 = hit.sha256;
      li.dataset.library = hit.library;
      const img = document.createElement("img");
      img.src = `${hit.url}?thumbnail=160`;
      img.alt = hit.name;
      const caption = document.createElement("span");
      caption.textContent = `${hit.score.toFixed(3)} · ${hit.library} · ${hit.dataset ?? ""} ${hit.name}${hit.label ? ` [${hit.label}]` : ""}`;
      const more = document.createElement("button");
      more.type = "button";
      more.textContent = section.dataset.more;
      more.addEventListener("click", async () => {
        const body = { from: hit.library, sha256: hit.sha256, ...Object.fromEntries(query()) };
        if (body.top) body.top = Number(body.top);
        if (body.dataset) body.dataset = Number(body.dataset);
        await show(await fetch("/api/v1/image-search/similar", {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
          body: JSON.stringify(body),
        }));
      });
      li.append(img, caption, more);
      return li;
    }));
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!picture) return;
    const s = picture.width / canvas.width;
    const area = crop ? { x: crop.x * s, y: crop.y * s, w: crop.w * s, h: crop.h * s } : { x: 0, y: 0, w: picture.width, h: picture.height };
    // At most 1024 pixels on the longer side: the embedder looks at far fewer, and a full-size
    // photo re-encoded as PNG could pass the 16 MiB a query may be.
    const shrink = Math.min(1, 1024 / Math.max(area.w, area.h));
    const out = new OffscreenCanvas(Math.max(1, Math.round(area.w * shrink)), Math.max(1, Math.round(area.h * shrink)));
    out.getContext("2d").drawImage(picture, area.x, area.y, area.w, area.h, 0, 0, out.width, out.height);
    const blob = await out.convertToBlob({ type: "image/png" });
    await show(await fetch(`/api/v1/image-search?${query()}`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": csrf(), Accept: "application/json" },
      body: blob,
    }));
  });
}
document.addEventListener("DOMContentLoaded", () => document.querySelectorAll("section[data-image-search]").forEach(imageSearch));
