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

function memoryText(memory) {
  if (!memory || typeof memory !== "object") return "";
  if (memory.allocated != null) {  // CUDA ranks
    const total = memory.total ? ` / ${fmtBytes(memory.total)}` : "";
    return `${fmtBytes(memory.allocated)} used, ${fmtBytes(memory.reserved)} reserved${total}`;
  }
  if (memory.rss != null) return `${fmtBytes(memory.rss)} RSS`;
  return fmtValue("memory", memory);
}

function modelText(model) {
  if (!model) return "none loaded";
  if (typeof model !== "object") return esc(model);
  const name = String(model.path ?? "").split(/[\\/]/).filter(Boolean).pop() ?? "";
  return [name, model.variant, model.dtype, model.attention && `attention ${model.attention}`].filter(Boolean).map(esc).join(" · ");
}

function lorasText(model) {
  const loras = model && Array.isArray(model.loras) ? model.loras : [];
  if (!model || typeof model !== "object") return "";
  if (!loras.length) return "none";
  return loras.map((l) => `<span class="xdit-lora">${esc(l.name)} <b>${esc(l.strength)}</b></span>`).join(" · ");
}

function layoutText(layout) {
  if (Array.isArray(layout) && layout.length === 3) return `cfg${layout[0]} x ulysses${layout[1]} x ring${layout[2]}`;
  return layout ? esc(layout) : "";
}

function row(label, value) {
  return value === "" || value == null ? "" :
    `<tr><td style="opacity:.65;padding:1px 8px 1px 0;vertical-align:top;white-space:nowrap">${esc(label)}</td><td>${value}</td></tr>`;
}

const STYLE = `
.xdit-cogvideo-panel .xdit-btn { font: inherit; font-size: 12px; padding: 3px 10px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333); color: var(--input-text, #ddd); }
.xdit-cogvideo-panel .xdit-btn:hover:not(:disabled) { filter: brightness(1.25); }
.xdit-cogvideo-panel .xdit-btn.xdit-stop:not(:disabled) { border-color: #c44; color: #f88; }
.xdit-cogvideo-panel .xdit-btn:disabled { opacity: .35; cursor: not-allowed; border-style: dashed; }
`;

function ensureStyle() {
  if (document.getElementById("xdit-cogvideo-style")) return;
  const style = document.createElement("style");
  style.id = "xdit-cogvideo-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

// "sample", "sample" -> "sample"; "decode", "queued" -> "decode · queued"
function jobLabel(kind, phase) {
  return [...new Set([kind, phase].filter(Boolean))].map(esc).join(" · ");
}

// What the pool is doing now: the websocket's last progress event while a job runs (it is fresher than the last
// status poll, which may even predate the job; it is cleared when the job ends), else the status' own job.
function currentJob(s) {
  const job = s && s.job && typeof s.job === "object" ? s.job : null;
  const live = state.live;
  if (live) {
    return { kind: live.job, phase: live.phase, step: live.step, total: live.total,
             seconds_per_step: live.seconds_per_step, node: live.node };
  }
  return job;
}

function renderInto(el) {
  ensureStyle();
  const s = state.status;
  const parts = [];
  const head = `<div style="display:flex;align-items:center;gap:6px;margin-bottom:8px">
      <b style="flex:1">xDiT pool</b>
      <button class="xdit-btn xdit-refresh" title="Refresh">Refresh</button>
      ${s && s.state && s.state !== "stopped"
        ? `<button class="xdit-btn xdit-stop" title="Stop the worker pool and free its GPUs (it restarts with the next job)">Stop</button>`
        : `<button class="xdit-btn xdit-stop" disabled title="The worker pool is not running">Stop</button>`}
    </div>`;
  if (state.error) parts.push(`<div style="color:#e66">Status unavailable: ${esc(state.error)}</div>`);
  if (!s) {
    parts.push(`<div style="opacity:.7">Loading…</div>`);
  } else if (s.running === false && !s.state) {
    parts.push(`<div class="xdit-state"><b>Not started.</b> The worker pool starts with the first xDiT CogVideoX job.</div>`);
    if (s.error) parts.push(`<div style="color:#e66">${esc(s.error)}</div>`);
  } else {
    const known = new Set(["ranks", "workers", "running", "state", "devices", "kind", "backend", "world_size", "model",
      "layout", "loads", "job", "jobs_done", "starts", "started_at", "last_error"]);
    const job = currentJob(s);
    const busy = s.state === "busy" || job != null;
    const rows = [
      row("state", `<b class="xdit-state">${esc(busy && s.state === "idle" ? "busy" : s.state ?? "running")}</b>`),
      row("devices", `${esc(s.devices ?? "")} <span style="opacity:.65">(${esc(s.backend ?? "")}, ${esc(s.world_size ?? "?")} rank${s.world_size === 1 ? "" : "s"})</span>`),
      row("model", modelText(s.model)),
      row("LoRAs", lorasText(s.model)),
      row("layout", layoutText(s.layout)),
      row("memory", s.model && typeof s.model === "object" && s.model.memory ? esc(s.model.memory) : ""),
      row("jobs", s.jobs_done != null ? `${esc(s.jobs_done)} done · ${esc(s.loads ?? 0)} model load${s.loads === 1 ? "" : "s"}` : ""),
      ...Object.entries(s).filter(([k]) => !known.has(k)).map(([k, v]) => row(k, fmtValue(k, v))),
    ];
    parts.push(`<table style="width:100%;font-size:12px;border-collapse:collapse">${rows.join("")}</table>`);
    const ranks = ranksOf(s);
    if (ranks.length) {
      // A rank's state and step come from its periodic heartbeat and lag behind the job: while the pool is busy
      // every rank works on the job (all ranks run each step together), so an "idle" heartbeat is stale. The step
      // is shown once, on the job line below, from the freshest source.
      parts.push(`<div class="xdit-ranks" style="margin-top:8px;font-size:12px">${ranks.map((r) => {
        const rankState = busy && (!r.state || r.state === "idle") ? "working" : r.state ?? "";
        const quiet = typeof r.last_seen_s === "number" && r.last_seen_s > 10 ? ` · <span style="color:#e96">no heartbeat for ${esc(Math.round(r.last_seen_s))} s</span>` : "";
        return `<div style="padding:4px 6px;margin-bottom:4px;border-radius:4px;background:var(--comfy-input-bg,#2a2a2a)">
          <b>rank ${esc(r.rank)}</b> · ${esc(r.device ?? "")} · ${esc(rankState)}${quiet}<br>
          <span style="opacity:.75">${memoryText(r.memory)}${r.pid ? ` · pid ${esc(r.pid)}` : ""}${r.host ? ` · ${esc(r.host)}` : ""}</span></div>`;
      }).join("")}</div>`);
    }
    if (job) {
      const sps = typeof job.seconds_per_step === "number" ? ` · ${job.seconds_per_step.toFixed(2)} s/step` : "";
      const node = job.node != null ? ` <span style="opacity:.65">(node #${esc(job.node)})</span>` : "";
      parts.push(`<div class="xdit-live" style="margin-top:10px;font-size:12px"><span style="opacity:.65">current job</span>
        ${jobLabel(job.kind, job.phase)} ${job.total ? `${esc(job.step)}/${esc(job.total)}` : ""}${sps}${node}
        ${job.total ? progressBar(job.step, job.total) : ""}</div>`);
    }
    if (s.last_error) parts.push(`<div style="margin-top:6px;font-size:12px;color:#e66"><span style="opacity:.65">last error</span> ${fmtValue("error", s.last_error)}</div>`);
  }
  if (state.job && state.job.state !== "started") {
    const j = state.job;
    parts.push(`<div class="xdit-last-job" style="margin-top:4px;font-size:12px;opacity:.8">last ${esc(j.job)}: ${esc(j.state)}${j.elapsed != null ? ` in ${esc(j.elapsed)} s` : ""}${j.error ? ` — ${esc(j.error)}` : ""}</div>`);
  }
  el.innerHTML = `<div class="xdit-cogvideo-panel" style="padding:10px;font-size:13px;line-height:1.4">${head}${parts.join("")}</div>`;
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

// ---- a model the workflow names but this ComfyUI does not have -----------------------------------------------------
// ComfyUI's frontend only checks combo values that look like model files (.safetensors ...); our loader lists
// diffusers folders, so a dropped workflow naming an absent folder would show nothing until Run fails. Mark the
// node (a red frame and a line above it, drawn only: nothing is saved into the workflow) and say once, on load,
// what to download and where.
const LOADER = "XDiTCogVideoModelLoader";
const DOWNLOADS = {
  "CogVideoX-2b": "THUDM/CogVideoX-2b", "CogVideoX-5b": "THUDM/CogVideoX-5b", "CogVideoX-5b-I2V": "THUDM/CogVideoX-5b-I2V",
  "CogVideoX1.5-5B": "THUDM/CogVideoX1.5-5B", "CogVideoX1.5-5B-I2V": "THUDM/CogVideoX1.5-5B-I2V",
};

function comboValues(widget) {
  const values = widget?.options?.values;
  return typeof values === "function" ? values() : values;
}

function missingModel(node) {
  if ((node?.comfyClass ?? node?.type) !== LOADER) return null;
  const widget = node.widgets?.find((w) => w.name === "model");
  const values = comboValues(widget);
  if (!widget || !Array.isArray(values) || values.includes(widget.value)) return null;
  return String(widget.value ?? "");
}

function howToGet(name) {
  const repo = DOWNLOADS[name];
  return repo ? `huggingface-cli download ${repo} --local-dir models/CogVideo/${name}`
              : `put the diffusers folder (or transformer .safetensors) at models/CogVideo/${name}`;
}

function flagMissingModels(graph) {
  const missing = [];
  for (const node of graph?.nodes ?? []) {
    const name = missingModel(node);
    node.xditMissingModel = name;  // a plain field, not a property: never serialized
    if (name != null) missing.push({ node, name });
  }
  if (!missing.length) return missing;
  const installed = comboValues(missing[0].node.widgets.find((w) => w.name === "model")) ?? [];
  const names = [...new Set(missing.map((m) => m.name))];
  app.extensionManager?.toast?.add({
    severity: "warn", life: 20000,
    summary: `xDiT CogVideoX: model ${names.map((n) => `'${n}'`).join(", ")} not installed`,
    detail: `${names.map(howToGet).join("; ")}, then press R. Installed now: ${installed.length ? installed.join(", ") : "none"}.`,
  });
  graph.setDirtyCanvas?.(true, true);
  return missing;
}

function drawMissingModel(node, ctx) {
  const name = missingModel(node);
  node.xditMissingModel = name;
  if (name == null || node.flags?.collapsed) return;
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.strokeStyle = "#e44";
  ctx.lineWidth = 2;
  ctx.strokeRect(-2, -title - 2, node.size[0] + 4, node.size[1] + title + 4);
  ctx.fillStyle = "#f66";
  ctx.font = "bold 12px sans-serif";  // below the widgets, inside the node (above it sit the title and badges)
  ctx.fillText(`⚠ '${name}' is not installed`, 10, node.size[1] - 24, node.size[0] - 20);
  ctx.font = "12px sans-serif";
  ctx.fillText("see the note: models/CogVideo, then R", 10, node.size[1] - 8, node.size[0] - 120);
  ctx.restore();
}

app.registerExtension({
  name: "xdit.cogvideo.pool",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== LOADER) return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = draw?.apply(this, arguments);
      try { drawMissingModel(this, ctx); } catch (e) { console.error("xdit_cogvideo missing model", e); }
      return result;
    };
  },
  async afterConfigureGraph() {
    try { flagMissingModels(app.graph); } catch (e) { console.error("xdit_cogvideo missing model", e); }
  },
  async setup() {
    let lastRefresh = 0;
    api.addEventListener("xdit_cogvideo.progress", ({ detail }) => {
      state.live = detail;
      renderAll();
      const now = Date.now();
      if (state.containers.size && now - lastRefresh > 1000) { lastRefresh = now; refresh(); }  // ranks' state/memory
    });
    api.addEventListener("xdit_cogvideo.job", ({ detail }) => {
      state.job = detail;
      if (detail?.state !== "started") state.live = null;  // the job line falls back to the status' (none when idle)
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
