// Suanli portal: submits `form.api` as JSON to the REST API, shows each field's problem beside
// it, and plots live monitoring. Plain JavaScript, no build step.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

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
  const res = await fetch(form.dataset.api, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : {};
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

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form.api").forEach((f) => f.addEventListener("submit", (ev) => submit(f, ev).catch((e) => (f.querySelector(".form-error").textContent = String(e)))));
  document.querySelectorAll("[data-logout]").forEach((b) =>
    b.addEventListener("click", async () => {
      await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } });
      location.href = "/";
    })
  );
  document.querySelectorAll("section[data-live]").forEach(live);
  document.querySelectorAll("pre[data-job-log]").forEach((p) => followLog(p).catch((e) => (p.dataset.error = String(e))));
  document.querySelectorAll("section[data-curves]").forEach((s) => followCurves(s, document.querySelector("pre[data-job-log]")?.dataset.live === "true"));
});
