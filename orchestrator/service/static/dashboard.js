// The dashboard's one script: fills the server's page shells from the /v1 API, every 2 s.
// Values go in as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;

function csrf() {
  const m = document.cookie.match(/(?:^|; )lorajobs_csrf=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ "X-CSRF-Token": csrf() }, options.headers || {});
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, options, { headers }));
  if (r.status === 401) { window.location = "/login"; throw new Error("signed out"); }
  return r;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

function progressCell(job) {
  const td = el("td");
  if (!job.total_steps) { td.textContent = "-"; return td; }
  const pct = Math.round(100 * (job.step || 0) / job.total_steps);
  const bar = el("span", null, "bar"); const fill = el("span"); fill.style.width = pct + "%";
  bar.appendChild(fill); td.appendChild(bar);
  td.appendChild(el("span", (job.step || 0) + "/" + job.total_steps, "progress"));
  return td;
}

function row(cells) { const tr = el("tr"); cells.forEach((c) => tr.appendChild(c)); return tr; }
function td(text, cls) { return el("td", text, cls); }
function fmtLoss(x) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(4); }

async function refreshQueue() {
  const r = await api("/v1/jobs?limit=100");
  if (!r.ok) return;
  const body = document.querySelector("#jobs tbody");
  const rows = (await r.json()).jobs.map((j) => {
    const link = el("a", j.id); link.href = "/jobs/" + j.id;
    const idCell = el("td"); idCell.appendChild(link);
    const tr = row([idCell, td(j.name), td(j.owner), td(j.state, "state state-" + j.state),
      progressCell(j), td(fmtLoss(j.loss), "loss"), td(duration(j.eta_s)), td(j.wait_reason || "")]);
    tr.dataset.job = j.id;
    return tr;
  });
  body.replaceChildren(...rows);
  const c = await api("/v1/cluster");
  if (c.ok) {
    const info = await c.json();
    document.getElementById("cluster").textContent =
      `Nodes: ${info.nodes.length} · GPUs in use: ${info.gpus_in_use} of ${info.gpus_total} · ` +
      `running: ${info.active_jobs} · queued: ${info.queued_jobs} (${info.queued_gpus} GPUs asked)`;
  }
}

function drawLoss(points) {
  const canvas = document.getElementById("loss");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.points = String(points.length);
  if (points.length < 2) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = (x) => 40 + (canvas.width - 50) * (x - x0) / Math.max(1e-9, x1 - x0);
  const Y = (y) => canvas.height - 20 - (canvas.height - 30) * (y - y0) / Math.max(1e-9, y1 - y0);
  ctx.strokeStyle = "#1f5fd6"; ctx.lineWidth = 2; ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#4a5163"; ctx.font = "11px sans-serif";
  ctx.fillText(y1.toFixed(3), 2, 14); ctx.fillText(y0.toFixed(3), 2, canvas.height - 22);
  ctx.fillText("step " + x1, canvas.width - 60, canvas.height - 4);
}

const jobState = { logOffset: 0, attempt: null, files: false };

async function refreshJob(id) {
  const r = await api("/v1/jobs/" + id);
  if (r.status === 404) { document.getElementById("summary").textContent = "No such job."; return; }
  const job = await r.json();
  const s = document.getElementById("summary");
  s.replaceChildren(el("span", job.state, "state state-" + job.state),
    el("span", ` · ${job.kind} '${job.name}' · owner ${job.owner} · step ${job.step || 0}/` +
      `${job.total_steps || "?"} · loss ${fmtLoss(job.loss)} · ETA ${duration(job.eta_s)}` +
      (job.wait_reason ? " · waiting: " + job.wait_reason : "")));
  document.getElementById("cancel").disabled = ["succeeded", "failed", "cancelled"].includes(job.state);
  document.getElementById("spec").textContent = JSON.stringify(job.spec, null, 2);
  document.querySelector("#attempts tbody").replaceChildren(
    row(["Attempt", "Dispatched", "Node", "Outcome", "Reason"].map((h) => el("th", h))),
    ...job.attempts.map((a) => row([td(a.attempt), td(a.dispatched_at), td(a.node || a.node_id || "-"),
      td(a.outcome || "running"), td(a.reason || "")])));
  document.querySelector("#events tbody").replaceChildren(
    ...job.events.map((e) => row([td(e.at), td((e.from_status || "-") + " → " + e.to_status),
      td(e.reason), td(e.data && e.data.by ? "by " + e.data.by : "")])));
  if (jobState.attempt !== job.attempt) { jobState.attempt = job.attempt; jobState.logOffset = 0;
    document.getElementById("log").textContent = ""; }
  const lg = await api(`/v1/jobs/${id}/logs?attempt=${job.attempt}&offset=${jobState.logOffset}`);
  if (lg.ok) {
    const text = await lg.text();
    jobState.logOffset += new TextEncoder().encode(text).length;
    const pre = document.getElementById("log"); pre.textContent += text; pre.scrollTop = pre.scrollHeight;
  }
  const m = await api(`/v1/jobs/${id}/metrics`);
  if (m.ok) drawLoss((await m.json()).loss);
  await showSamples(id);
  if (job.state === "succeeded" && !jobState.files) await showFiles(id);
}

async function showFiles(id) {
  const r = await api(`/v1/jobs/${id}/adapter`);
  if (!r.ok) return;
  jobState.files = true;
  const files = (await r.json()).files;
  document.getElementById("files").replaceChildren(...files.map((f) => {
    const li = el("li"); const a = el("a", f.path); a.href = f.url; a.download = f.path.split("/").pop();
    li.appendChild(a); li.appendChild(el("span", ` ${f.size} bytes · sha256 ${f.sha256.slice(0, 12)}…`));
    return li;
  }));
}

async function showSamples(id) {
  // Sample grids as the worker renders them (image jobs with `samples:`), newest first.
  const r = await api(`/v1/jobs/${id}/samples`);
  if (!r.ok) return;
  const grids = (await r.json()).slice(0, 4);
  const box = document.getElementById("samples");
  if (box.dataset.shown === grids.map((g) => g.step).join(",")) return;
  box.dataset.shown = grids.map((g) => g.step).join(",");
  box.replaceChildren(...grids.map((g) => {
    const fig = el("figure"); const img = el("img"); img.src = g.url; img.alt = "step " + g.step;
    fig.appendChild(img); fig.appendChild(el("figcaption", "step " + g.step)); return fig;
  }));
}

async function cancelJob(id) {
  const r = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
  const body = await r.json();
  document.getElementById("msg").textContent = r.ok ? "cancel requested" : body.error;
}

async function refreshAdapters() {
  const r = await api("/v1/adapters");
  if (!r.ok) return;
  document.querySelector("#adapters tbody").replaceChildren(...(await r.json()).map((a) => {
    const link = el("a", a.job_id); link.href = "/jobs/" + a.job_id;
    const cell = el("td"); cell.appendChild(link);
    return row([td(a.name), cell, td(a.owner), td(a.size + " B"), td(a.base_model || "-"), td(a.created || "-")]);
  }));
}

function every(fn) { fn().catch(() => {}); setInterval(() => fn().catch(() => {}), POLL_MS); }

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "queue") every(refreshQueue);
  if (page === "adapters") every(refreshAdapters);
  if (page === "job") {
    const id = document.getElementById("title").dataset.job;
    document.getElementById("cancel").addEventListener("click", () => cancelJob(id));
    every(() => refreshJob(id));
  }
});
