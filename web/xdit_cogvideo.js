// xDiT CogVideoX: a sidebar panel showing the multi-GPU worker pool (devices, ranks, memory, current job/step).
// Fed by GET /xdit_cogvideo/status (never starts the pool) and the websocket events
// "xdit_cogvideo.progress" / "xdit_cogvideo.job" sent by the nodes while they run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "xdit-cogvideo-pool";
const POLL_MS = 3000;

const state = {
  status: null,       // last GET /xdit_cogvideo/status answer
  error: null,        // fetch error text
  live: null,         // last progress event {phase, step, total, seconds_per_step, node, job}
  job: null,          // last job event
  containers: new Set(),
  timer: null,
};

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmtBytes(value) {
  if (typeof value !== "number" || !isFinite(value)) return value == null ? "" : esc(value);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtValue(key, value) {
  if (value == null) return "";
  if (typeof value === "number" && /mem|bytes|allocated|reserved/i.test(key)) return fmtBytes(value);
  if (typeof value === "object") {
    return esc(Object.entries(value).map(([k, v]) => `${k}: ${typeof v === "number" && /mem|bytes|allocated|reserved|total|used|free/i.test(k) ? fmtBytes(v) : typeof v === "object" ? JSON.stringify(v) : v}`).join(", "));
  }
  return esc(value);
}

function progressBar(step, total) {
  const pct = total ? Math.max(0, Math.min(100, (100 * step) / total)) : 0;
  return `<div style="height:6px;background:var(--comfy-input-bg,#333);border-radius:3px;overflow:hidden;margin:4px 0">
    <div style="height:100%;width:${pct.toFixed(1)}%;background:var(--p-primary-color,#4a9eff)"></div></div>`;
}

function ranksOf(status) {
  const ranks = status.ranks ?? status.workers ?? [];
  return Array.isArray(ranks) ? ranks : Object.entries(ranks).map(([rank, info]) => ({ rank, ...info }));
}

function renderInto(el) {
  const s = state.status;
  const rows = [];
  const head = `<div style="display:flex;align-items:center;gap:8px;margin-bottom:8px">
      <b style="flex:1">xDiT CogVideoX pool</b>
      <button class="xdit-refresh" title="Refresh" style="cursor:pointer">Refresh</button>
      <button class="xdit-stop" title="Stop the worker pool and free its GPUs (restarts with the next job)" style="cursor:pointer"${s && s.state ? "" : " disabled"}>Stop pool</button>
    </div>`;
  if (state.error) rows.push(`<div style="color:#e66">Status unavailable: ${esc(state.error)}</div>`);
  if (!s) {
    rows.push(`<div style="opacity:.7">Loading…</div>`);
  } else if (s.running === false && !s.state) {
    rows.push(`<div class="xdit-state"><b>Not started.</b> The pool starts with the first xDiT CogVideoX job.</div>`);
    if (s.error) rows.push(`<div style="color:#e66">${esc(s.error)}</div>`);
  } else {
    const skip = new Set(["ranks", "workers", "running", "state", "current_job", "job", "last_error", "model", "loaded_model"]);
    const fields = Object.entries(s).filter(([k]) => !skip.has(k));
    rows.push(`<div class="xdit-state"><b>${esc(s.state ?? "running")}</b></div>`);
    rows.push(`<table style="width:100%;font-size:12px;border-collapse:collapse">${fields.map(([k, v]) =>
      `<tr><td style="opacity:.7;padding-right:8px;vertical-align:top">${esc(k)}</td><td>${fmtValue(k, v)}</td></tr>`).join("")}</table>`);
    const model = s.loaded_model ?? s.model;
    if (model) rows.push(`<div style="margin-top:6px"><span style="opacity:.7">model</span> ${fmtValue("model", model)}</div>`);
    const ranks = ranksOf(s);
    if (ranks.length) {
      const keys = [...new Set(ranks.flatMap((r) => Object.keys(r)))];
      rows.push(`<table class="xdit-ranks" style="width:100%;font-size:12px;margin-top:8px;border-collapse:collapse">
        <tr>${keys.map((k) => `<th style="text-align:left;border-bottom:1px solid #555;padding:2px 4px">${esc(k)}</th>`).join("")}</tr>
        ${ranks.map((r) => `<tr>${keys.map((k) => `<td style="padding:2px 4px">${fmtValue(k, r[k])}</td>`).join("")}</tr>`).join("")}
      </table>`);
    }
    const job = s.current_job ?? s.job;
    if (job) rows.push(`<div style="margin-top:8px"><span style="opacity:.7">current job</span> ${fmtValue("job", job)}</div>`);
    if (s.last_error) rows.push(`<div style="margin-top:8px;color:#e66"><span style="opacity:.7">last error</span> ${fmtValue("error", s.last_error)}</div>`);
  }
  const live = state.live;
  if (live) {
    const sps = typeof live.seconds_per_step === "number" ? ` · ${live.seconds_per_step.toFixed(2)} s/step` : "";
    rows.push(`<div class="xdit-live" style="margin-top:10px"><span style="opacity:.7">${esc(live.job ?? "")} ${esc(live.phase ?? "")}</span>
      ${esc(live.step)}/${esc(live.total)}${sps} <span style="opacity:.7">(node ${esc(live.node ?? "?")})</span>
      ${progressBar(live.step, live.total)}</div>`);
  }
  if (state.job && state.job.state !== "started") {
    const j = state.job;
    rows.push(`<div style="margin-top:4px;font-size:12px;opacity:.8">last ${esc(j.job)}: ${esc(j.state)}${j.elapsed != null ? ` in ${esc(j.elapsed)} s` : ""}${j.error ? ` — ${esc(j.error)}` : ""}</div>`);
  }
  el.innerHTML = `<div class="xdit-cogvideo-panel" style="padding:10px;font-size:13px;line-height:1.4">${head}${rows.join("")}</div>`;
  el.querySelector(".xdit-refresh")?.addEventListener("click", () => refresh());
  el.querySelector(".xdit-stop")?.addEventListener("click", async () => {
    try { await api.fetchApi("/xdit_cogvideo/shutdown", { method: "POST" }); } catch (e) { /* shown by refresh */ }
    state.live = null;
    refresh();
  });
}

function renderAll() {
  for (const el of state.containers) {
    try { renderInto(el); } catch (e) { console.error("xdit_cogvideo panel", e); }
  }
}

let inflight = null;
async function refresh() {
  if (inflight) return inflight;
  inflight = (async () => {
    try {
      const res = await api.fetchApi("/xdit_cogvideo/status");
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      state.status = await res.json();
      state.error = null;
    } catch (e) {
      state.error = e?.message ?? String(e);
      if (!state.status) state.status = { running: false };
    } finally {
      inflight = null;
      renderAll();
    }
  })();
  return inflight;
}

function startPolling() {
  if (!state.timer) state.timer = setInterval(refresh, POLL_MS);
}

function stopPolling() {
  if (state.timer && state.containers.size === 0) { clearInterval(state.timer); state.timer = null; }
}

function mount(el) {
  state.containers.add(el);
  renderInto(el);
  refresh();
  startPolling();
}

function unmount(el) {
  state.containers.delete(el);
  stopPolling();
}

app.registerExtension({
  name: "xdit.cogvideo.pool",
  async setup() {
    api.addEventListener("xdit_cogvideo.progress", ({ detail }) => {
      state.live = detail;
      renderAll();
    });
    api.addEventListener("xdit_cogvideo.job", ({ detail }) => {
      state.job = detail;
      if (detail?.state !== "started") refresh();
      else renderAll();
    });
    const manager = app.extensionManager;
    let current = null;
    if (manager?.registerSidebarTab) {
      manager.registerSidebarTab({
        id: TAB_ID,
        icon: "pi pi-server",
        title: "xDiT",
        tooltip: "xDiT CogVideoX worker pool",
        type: "custom",
        render: (el) => { if (current) unmount(current); current = el; mount(el); },
        destroy: () => { if (current) unmount(current); current = null; },
      });
    } else {
      // Older frontends without sidebar tabs: a small fixed box in the corner.
      const box = document.createElement("div");
      box.id = TAB_ID;
      box.style.cssText = "position:fixed;right:8px;bottom:8px;width:320px;max-height:50vh;overflow:auto;z-index:1000;" +
        "background:var(--comfy-menu-bg,#222);color:var(--fg-color,#ddd);border:1px solid #444;border-radius:6px";
      document.body.appendChild(box);
      mount(box);
    }
  },
});
