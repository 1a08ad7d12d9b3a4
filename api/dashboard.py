# ruff: noqa: E501 - an embedded HTML page; its lines are markup, not Python
"""The dashboard: one self-contained page (no CDN): GPUs, queue, jobs, and a live loss chart.

The page itself is public; every data call sends the API token the user pastes into it (kept in the
browser's localStorage, sent as `Authorization: Bearer`, never put in a URL). The chart loads the
step history from /jobs/{id}/metrics, then follows /jobs/{id}/events (SSE read with fetch, because
EventSource cannot send headers).
"""

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>trainbox</title>
<style>
:root{--bg:#0f1216;--panel:#171b21;--line:#2a313a;--fg:#d8dee6;--dim:#8a94a3;--acc:#4fa3ff;--ok:#3ecf8e;--bad:#ff6b6b;--warn:#f5b942}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:1rem;align-items:center;padding:.6rem 1rem;border-bottom:1px solid var(--line)}
header h1{font-size:1.1rem;margin:0}#health{color:var(--dim);font-size:.85rem}
main{display:grid;grid-template-columns:minmax(320px,1fr) 2fr;gap:1rem;padding:1rem}
section{background:var(--panel);border:1px solid var(--line);border-radius:6px;padding:.8rem;overflow:auto}
h2{font-size:.95rem;margin:0 0 .6rem;color:var(--dim);font-weight:600}
table{border-collapse:collapse;width:100%}td,th{padding:.3rem .4rem;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{color:var(--dim);font-weight:500}tr.job{cursor:pointer}tr.job:hover,tr.sel{background:#1f2630}
.state{padding:.05rem .4rem;border-radius:3px;font-size:.8rem;background:#252c35}
.running,.starting{color:var(--acc)}.succeeded{color:var(--ok)}.failed{color:var(--bad)}.cancelling,.cancelled{color:var(--warn)}
.bar{width:90px;height:6px;background:#252c35;border-radius:3px;display:inline-block;vertical-align:middle}
.bar i{display:block;height:100%;background:var(--acc);border-radius:3px}
.gpus{display:flex;flex-wrap:wrap;gap:.4rem}.gpu{border:1px solid var(--line);border-radius:4px;padding:.3rem .5rem;min-width:120px;font-size:.8rem}
.gpu.busy{border-color:var(--acc)}.dim{color:var(--dim)}button{background:#252c35;color:var(--fg);border:1px solid var(--line);border-radius:4px;cursor:pointer}
#chartwrap{position:relative}canvas{width:100%;height:260px;display:block}#stats{display:flex;gap:1.2rem;flex-wrap:wrap;margin:.5rem 0}
#stats div b{display:block;font-size:1.1rem}#log{max-height:180px;overflow:auto;font:12px monospace;color:var(--dim);white-space:pre-wrap}
</style></head><body>
<header><h1>trainbox</h1><span id="health">checking...</span>
<form id="login" style="margin-left:auto"><input id="token" type="password" placeholder="API token (trainbox-admin tokens create)" size="34" autocomplete="off"> <button>use token</button></form></header>
<main>
<div>
<section><h2>GPUs</h2><div id="gpus" class="gpus"></div></section>
<section style="margin-top:1rem"><h2>Queue</h2><table><thead><tr><th>#</th><th>job</th><th>owner</th><th>gpus</th><th>prio</th></tr></thead><tbody id="queue"></tbody></table></section>
</div>
<div>
<section><h2>Jobs</h2><table><thead><tr><th>job</th><th>owner</th><th>state</th><th>gpus</th><th>progress</th><th>loss</th><th>tokens/s</th><th>eta</th><th></th></tr></thead><tbody id="jobs"></tbody></table></section>
<section style="margin-top:1rem"><h2 id="title">Select a job</h2><div id="stats"></div>
<div id="chartwrap"><canvas id="chart"></canvas></div><div id="log"></div></section>
</div></main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmt = (v, d = 3) => v == null ? "-" : (Math.abs(v) >= 1000 ? Math.round(v).toLocaleString() : Number(v).toPrecision(d));
const eta = (s) => s == null ? "-" : s < 90 ? Math.round(s) + "s" : s < 5400 ? Math.round(s / 60) + "m" : (s / 3600).toFixed(1) + "h";
const auth = (h = {}) => { const t = localStorage.getItem("trainbox-token"); return t ? {...h, Authorization: "Bearer " + t} : h; };
async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: auth(opts.headers)});
  if (r.status === 401) $("health").textContent = "paste an API token (top right) to see the queue";
  if (!r.ok) throw new Error(path + ": " + r.status); return r.json();
}
$("login").addEventListener("submit", (ev) => { ev.preventDefault(); const t = $("token").value.trim();
  if (t) localStorage.setItem("trainbox-token", t); else localStorage.removeItem("trainbox-token"); $("token").value = ""; refresh(); });

// Server-Sent Events over fetch: EventSource cannot send the Authorization header. A stream that
// ends or breaks before the job's final `end` is resumed from the last event id (the server's one
// resume protocol: nothing lost, nothing repeated).
async function stream(path, on, signal) {
  let after = new URL(path, location.href).searchParams.get("after") || "0-0:0";
  const base = path.split("?")[0];
  while (!signal.aborted) {
    let ended = false;
    try {
      const r = await fetch(`${base}?after=${encodeURIComponent(after)}`, {headers: auth({Accept: "text/event-stream"}), signal});
      if (r.status === 401 || r.status === 404) return;
      if (r.ok && r.body) {
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "", name = "message", data = [], id = null;
        for (;;) {
          const {value, done} = await reader.read(); if (done) break;
          buf += value; let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i).replace(/\r$/, ""); buf = buf.slice(i + 1);
            if (line === "") {
              if (data.length) {
                if (id) after = id;
                if (name === "end" && JSON.parse(data.join("\n")).state) ended = true;
                if (on[name]) on[name]({data: data.join("\n")});
              }
              name = "message"; data = []; id = null;
            }
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            else if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("id:")) id = line.slice(3).trim();
          }
        }
      }
    } catch (e) { if (signal.aborted) return; }
    if (ended) return;
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

let selected = null, source = null, points = [], tput = [];

async function refresh() {
  try { const h = await api("/healthz"); $("health").textContent = "db " + h.database + " / redis " + h.redis; }
  catch (e) { $("health").textContent = "unhealthy"; }
  try {
    const g = await api("/gpus");
    $("gpus").innerHTML = g.data.flatMap((b) => b.gpus.map((x) =>
      `<div class="gpu ${x.job ? "busy" : ""}"><b>${esc(b.name)}:${x.index}</b> <span class="dim">${esc(x.name)}</span><br>` +
      (x.job ? `${esc(x.job.name)} <span class="dim">(${esc(x.job.owner)})</span>` : '<span class="dim">free</span>') + "</div>")).join("")
      || '<span class="dim">no boxes registered yet</span>';
    const q = await api("/queue");
    $("queue").innerHTML = q.data.map((j) =>
      `<tr><td>${j.queue_position ?? esc(j.state)}</td><td>${esc(j.name)}</td><td>${esc(j.owner)}</td><td>${j.gpus}</td><td>${j.priority}</td></tr>`).join("")
      || '<tr><td colspan="5" class="dim">empty</td></tr>';
    const jobs = await api("/jobs?limit=50");
    $("jobs").innerHTML = jobs.data.map((j) => {
      const f = j.progress.fraction, l = j.latest || {};
      const live = ["queued", "starting", "running"].includes(j.state);
      return `<tr class="job ${j.id === selected ? "sel" : ""}" data-id="${esc(j.id)}"><td>${esc(j.name)}<br><span class="dim">${esc(j.id)}</span></td>` +
        `<td>${esc(j.owner)}</td><td><span class="state ${esc(j.state)}">${esc(j.state)}</span></td><td>${j.gpus}</td>` +
        `<td><span class="bar"><i style="width:${f == null ? 0 : Math.round(f * 100)}%"></i></span> ${j.progress.step ?? ""}/${j.progress.total_steps ?? ""}</td>` +
        `<td>${fmt(l.loss)}</td><td>${fmt(l.tokens_per_s)}</td><td>${eta(j.progress.eta_s)}</td>` +
        `<td>${live ? `<button data-cancel="${esc(j.id)}">cancel</button>` : ""}</td></tr>`;
    }).join("") || '<tr><td colspan="9" class="dim">no jobs yet</td></tr>';
  } catch (e) { console.error(e); }
}

$("jobs").addEventListener("click", async (ev) => {
  const cancel = ev.target.closest("[data-cancel]");
  if (cancel) { ev.stopPropagation(); await fetch(`/jobs/${cancel.dataset.cancel}/cancel`, {method: "POST", headers: auth()}); refresh(); return; }
  const row = ev.target.closest("tr.job"); if (row) select(row.dataset.id);
});

function addPoint(m) {
  if (m.step == null || m.loss == null) return;
  const i = points.findIndex((p) => p.step >= m.step);
  if (i >= 0 && points[i].step === m.step) points[i] = {step: m.step, loss: m.loss};
  else if (i < 0) points.push({step: m.step, loss: m.loss}); else points.splice(i, 0, {step: m.step, loss: m.loss});
  if (m.tokens_per_s != null) tput.push(m.tokens_per_s);
}

function stats(m) {
  const items = [["step", m.step], ["loss", fmt(m.loss, 4)], ["lr", fmt(m.lr, 2)], ["samples/s", fmt(m.samples_per_s)],
    ["tokens/s", fmt(m.tokens_per_s)], ["MFU", m.mfu == null ? "-" : (100 * m.mfu).toFixed(1) + "%"], ["GPU mem", m.gpu_mem_gb == null ? "-" : fmt(m.gpu_mem_gb) + " GB"]];
  $("stats").innerHTML = items.map(([k, v]) => `<div><span class="dim">${k}</span><b>${esc(v ?? "-")}</b></div>`).join("");
}

async function select(id) {
  selected = id; points = []; tput = []; $("log").textContent = "";
  if (source) source.abort();
  const job = await api(`/jobs/${id}`);
  $("title").textContent = `${job.name} (${job.id}): ${job.state}`;
  const hist = await api(`/jobs/${id}/metrics?limit=10000`);
  hist.data.forEach(addPoint); if (hist.data.length) stats(hist.data[hist.data.length - 1]);
  draw();
  // Resume after the history just loaded: `0-0:<step>` sends the stream's other events and only newer steps.
  const after = `0-0:${hist.data.length ? hist.data[hist.data.length - 1].step : 0}`;
  source = new AbortController();
  stream(`/jobs/${id}/events?after=${after}`, {
    step: (e) => { const m = JSON.parse(e.data); addPoint(m); stats(m); draw(); },
    log: (e) => { const d = JSON.parse(e.data); const el = $("log");
      el.textContent += (d.lines || [d.line || d.text || ""]).join("\n") + "\n"; el.scrollTop = el.scrollHeight; },
    state: (e) => { const d = JSON.parse(e.data); if (d.state) $("title").textContent = `${job.name} (${job.id}): ${d.state}`; },
    end: (e) => { const d = JSON.parse(e.data); if (d.state) { $("title").textContent = `${job.name} (${job.id}): ${d.state}`; refresh(); } },
  }, source.signal).catch(() => {});
  refresh();
}

function draw() {
  const c = $("chart"), dpr = window.devicePixelRatio || 1, w = c.clientWidth, h = c.clientHeight;
  c.width = w * dpr; c.height = h * dpr; const g = c.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, w, h);
  const pad = {l: 48, r: 10, t: 10, b: 24};
  g.strokeStyle = "#2a313a"; g.fillStyle = "#8a94a3"; g.font = "11px system-ui";
  if (points.length < 1) { g.fillText("no steps yet", pad.l, h / 2); return; }
  const xs = points.map((p) => p.step), ys = points.map((p) => p.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (s) => pad.l + (s - x0) / (x1 - x0) * (w - pad.l - pad.r), Y = (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  for (let i = 0; i <= 4; i++) { const v = y0 + (y1 - y0) * i / 4, y = Y(v);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke(); g.fillText(v.toPrecision(3), 4, y + 4); }
  g.fillText("step " + x0, pad.l, h - 6); g.fillText("step " + x1, w - pad.r - 60, h - 6);
  g.strokeStyle = "#4fa3ff"; g.lineWidth = 1.5; g.beginPath();
  points.forEach((p, i) => i ? g.lineTo(X(p.step), Y(p.loss)) : g.moveTo(X(p.step), Y(p.loss))); g.stroke();
}

window.addEventListener("resize", draw);
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""
