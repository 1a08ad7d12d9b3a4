"use strict";
// The trainbox dashboard. One request per refresh (GET /overview: who you are, slots, queue, your
// jobs, and the open job), plus, on a job's page, its live event stream and its log. Every string
// from the server goes through esc() (or textContent) before it reaches the page.
(() => {
  const REFRESH_MS = 3000;
  const TOKEN_KEY = "trainbox-token";
  const ACTIVE = ["queued", "starting", "running", "cancelling"];
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  const fmt = (v, d = 3) => {
    if (v == null || typeof v !== "number") return "-";
    if (!isFinite(v)) return String(v);
    if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en-US");
    if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(1);
    return String(Number(v.toPrecision(d)));
  };
  const dur = (s) => {
    if (s == null || !isFinite(s)) return "-";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + String(s % 60).padStart(2, "0") + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + String(Math.floor(s / 60) % 60).padStart(2, "0") + " m";
    return Math.floor(s / 86400) + " d " + (Math.floor(s / 3600) % 24) + " h";
  };
  const bytes = (n) => (n == null ? "-" : n < 1e3 ? n + " B" : n < 1e6 ? fmt(n / 1e3) + " kB" : n < 1e9 ? fmt(n / 1e6) + " MB" : fmt(n / 1e9) + " GB");
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");

  const S = {overview: null, lastOk: 0, skew: 0, failing: null, timer: null, inflight: null, generation: 0,
    route: null, job: null, listScroll: 0};

  // ---- the token and the API ---------------------------------------------------------------------
  const token = () => localStorage.getItem(TOKEN_KEY);
  const auth = (h = {}) => { const t = token(); return t ? {...h, Authorization: "Bearer " + t} : {...h}; };

  class Rejected extends Error {}
  class Unreachable extends Error {}
  class HttpError extends Error { constructor(status, msg) { super(msg); this.status = status; } }

  async function request(path, opts = {}) {
    let r;
    try {
      r = await fetch(path, {...opts, headers: auth(opts.headers), cache: "no-store"});
    } catch (e) {
      throw new Unreachable("server unreachable");
    }
    if (r.status === 401) { rejected(); throw new Rejected("token rejected"); }
    if (!r.ok && !(opts.okStatuses || []).includes(r.status)) {
      let msg = "HTTP " + r.status;
      try { const b = await r.json(); if (b.detail && b.detail[0]) msg = b.detail[0].msg; } catch (e) { /* not JSON */ }
      throw new HttpError(r.status, msg);
    }
    return r;
  }
  const getJSON = async (path) => (await request(path)).json();

  // ---- sessions ----------------------------------------------------------------------------------
  function clearScreen() {
    closeJob();
    S.overview = null;
    for (const id of ["gpus", "queue", "jobs", "gpu-count", "whoami", "updated"]) { $(id).innerHTML = ""; }
    rendered.clear();
    $("list-view").hidden = true;
    $("job-view").hidden = true;
    $("banner").hidden = true;
  }

  function signedOut(message) {
    S.generation++;
    clearTimeout(S.timer);
    S.lastOk = 0;
    S.failing = null;
    clearScreen();
    $("session").hidden = true;
    $("signin").hidden = false;
    $("notice").textContent = message;
  }

  function rejected() {
    if (!token()) return;
    localStorage.removeItem(TOKEN_KEY);
    signedOut("token rejected: the server does not accept this token (wrong, revoked or expired). Paste a valid one.");
    $("token").focus();
  }

  $("signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    if (!t) { $("notice").textContent = "paste an API token first (trainbox-admin tokens create NAME)"; return; }
    localStorage.setItem(TOKEN_KEY, t);
    $("notice").textContent = "";
    start();
  });

  $("signout").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    signedOut("signed out");
    $("token").focus();
  });

  // ---- polling: one request per refresh --------------------------------------------------------
  function start() {
    S.generation++;
    clearTimeout(S.timer);
    $("signin").hidden = true;
    S.route = null;  // the screen was cleared: open the page the URL names again
    route();
  }

  async function refresh() {
    clearTimeout(S.timer);
    if (!token()) { signedOut("Sign in with an API token (trainbox-admin tokens create NAME)."); return; }
    const gen = S.generation;
    const jobId = S.route && S.route.job;
    try {
      const ov = await getJSON("/overview" + (jobId ? "?job=" + encodeURIComponent(jobId) : ""));
      if (gen !== S.generation) return;
      S.overview = ov;
      S.lastOk = Date.now();
      S.skew = Date.parse(ov.now) - Date.now();
      S.failing = null;
      render(ov);
    } catch (e) {
      if (gen !== S.generation || e instanceof Rejected) return;
      if (e instanceof HttpError && e.status === 404 && jobId) {
        S.lastOk = Date.now(); S.failing = null;
        jobMissing(jobId);
      } else {
        S.failing = e instanceof Unreachable ? "server unreachable" : "server error: " + e.message;
      }
    }
    tick();
    if (gen === S.generation) S.timer = setTimeout(refresh, REFRESH_MS);
  }
  const refreshSoon = (() => { let t = null; return () => { clearTimeout(t); t = setTimeout(refresh, 200); }; })();

  // Once a second: "last update N s ago", the banner, elapsed times, the stream's liveness.
  function tick() {
    const ago = S.lastOk ? Math.round((Date.now() - S.lastOk) / 1000) : null;
    $("updated").textContent = ago == null ? "" : `last update ${ago} s ago`;
    const banner = $("banner");
    if (S.failing && token()) {
      banner.textContent = `${S.failing}: showing what was last received${ago == null ? "" : ` (last update ${ago} s ago)`}; retrying every ${REFRESH_MS / 1000} s`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
    if (S.job) renderLive();
  }
  setInterval(tick, 1000);

  // ---- rendering that keeps focus and scroll -----------------------------------------------------
  const rendered = new Map();
  // Replace a container's HTML only when it changed; give focus back to the element with the same key.
  function put(id, html) {
    if (rendered.get(id) === html) return;
    const el = $(id), active = document.activeElement;
    const key = active && el.contains(active) ? active.dataset.key : null;
    const scroll = el.scrollTop;
    el.innerHTML = html;
    rendered.set(id, html);
    el.scrollTop = scroll;
    if (key) { const again = el.querySelector(`[data-key="${CSS.escape(key)}"]`); if (again) again.focus({preventScroll: true}); }
  }

  const serverNow = () => Date.now() + S.skew;
  const since = (iso) => (iso ? (serverNow() - Date.parse(iso)) / 1000 : null);
  const stateBadge = (s) => `<span class="state ${esc(s)}">${esc(s)}</span>`;

  function render(ov) {
    $("whoami").textContent = ov.user.name + (ov.user.is_admin ? " (admin)" : "");
    $("session").hidden = false;
    $("signin").hidden = true;
    $("notice").textContent = "";
    renderSlots(ov);
    renderQueue(ov);
    renderJobs(ov);
    if (S.route.job) {
      $("list-view").hidden = true;
      $("job-view").hidden = false;
      if (ov.job) renderJob(ov.job);
    } else {
      $("job-view").hidden = true;
      $("list-view").hidden = false;
    }
  }

  function renderSlots(ov) {
    const active = new Map(ov.queue.data.filter((q) => q.started_at).map((q) => [q.id || q.owner + "/" + q.name, q]));
    $("gpu-count").textContent = `${ov.gpus.in_use} of ${ov.gpus.total} in use`;
    put("gpus", ov.gpus.data.flatMap((b) => b.gpus.map((g) => {
      let holder = '<span class="dim">free</span>';
      if (g.job) {
        const q = active.get(g.job.id || g.job.owner + "/" + g.job.name);
        const name = g.job.id ? `<a href="#/jobs/${esc(g.job.id)}">${esc(g.job.name)}</a>` : esc(g.job.name);
        holder = `${name} <span class="dim">(${esc(g.job.owner)}, ${esc(g.job.state)}${q ? ", for " + dur(since(q.started_at)) : ""})</span>`;
      } else if (g.busy) {
        holder = '<span class="dim">busy outside trainbox</span>';
      }
      return `<div class="gpu ${g.job ? "held" : ""}"><b>${esc(b.name)}:${esc(g.index)}</b> <span class="dim">${esc(g.name)}</span><br>${holder}</div>`;
    })).join("") || '<span class="dim">no boxes registered yet</span>');
  }

  const QUEUE_ROWS = 100;  // a long queue: its head, and how many more wait (the page stays light)
  function renderQueue(ov) {
    const more = ov.queue.data.length - QUEUE_ROWS;
    put("queue", ov.queue.data.slice(0, QUEUE_ROWS).map((q) => {
      const pos = q.queue_position ?? stateBadge(q.state);
      const name = q.id ? `<a href="#/jobs/${esc(q.id)}" data-key="q${esc(q.id)}">${esc(q.name)}</a>` : esc(q.name);
      let start;
      if (q.started_at) start = `running ${dur(since(q.started_at))}`;
      else if (q.start_eta_s != null) start = `in ~${dur(q.start_eta_s)}`;
      else start = '<span class="dim">unknown</span>';
      return `<tr><td>${pos}</td><td>${name}</td><td>${esc(q.owner)}</td><td>${esc(q.gpus)}</td><td>${esc(q.priority)}</td><td>${start}</td></tr>`;
    }).join("") + (more > 0 ? `<tr><td colspan="6" class="dim">and ${more} more waiting</td></tr>` : "") ||
      '<tr><td colspan="6" class="dim">nothing queued or running</td></tr>');
  }

  function jobTime(j) {
    if (j.state === "queued") return j.start_eta_s != null ? `starts in ~${dur(j.start_eta_s)}` : `waiting ${dur(since(j.created_at))}`;
    if (j.started_at && j.finished_at) return `took ${dur((Date.parse(j.finished_at) - Date.parse(j.started_at)) / 1000)}`;
    if (j.started_at) return `${dur(since(j.started_at))}` + (j.progress.eta_s != null ? `, ${dur(j.progress.eta_s)} left` : "");
    return j.finished_at ? when(j.finished_at) : "-";
  }

  function renderJobs(ov) {
    put("jobs", ov.jobs.data.map((j) => {
      const p = j.progress, l = j.latest || {};
      const bar = p.fraction == null ? "" : `<progress max="1" value="${esc(p.fraction)}" aria-label="progress"></progress> `;
      const err = j.error && j.error.type ? ` <span class="failed small">${esc(j.error.type)}</span>` : "";
      const gpus = j.gpu_ids ? `${esc(j.gpus)} <span class="dim">(${esc(j.box || "")}: ${j.gpu_ids.map(esc).join(",")})</span>` : esc(j.gpus);
      return `<tr class="job" tabindex="0" data-key="${esc(j.id)}" data-id="${esc(j.id)}" aria-label="open job ${esc(j.name)}">` +
        `<td>${esc(j.name)}<br><span class="dim small">${esc(j.id)}</span></td><td>${esc(j.owner)}</td>` +
        `<td>${stateBadge(j.state)}${err}</td><td class="wide">${gpus}</td>` +
        `<td>${bar}${esc(p.step ?? "")}/${esc(p.total_steps ?? "")}</td><td class="wide">${fmt(l.loss)}</td>` +
        `<td class="wide">${fmt(l.tokens_per_s)}</td><td>${jobTime(j)}</td></tr>`;
    }).join("") || '<tr><td colspan="8" class="dim">no jobs yet</td></tr>');
  }

  const openRow = (row) => { if (row && row.dataset.id) location.hash = "#/jobs/" + encodeURIComponent(row.dataset.id); };
  $("jobs").addEventListener("click", (ev) => openRow(ev.target.closest("tr.job")));
  $("jobs").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { const row = ev.target.closest("tr.job"); if (row) { ev.preventDefault(); openRow(row); } }
  });

  // ---- routes: the list (#/) and a job page (#/jobs/<id>) -----------------------------------------
  function route() {
    const m = location.hash.match(/^#\/jobs\/([A-Za-z0-9_-]{1,32})$/);
    const jobId = m ? m[1] : null;
    const before = S.route;
    S.route = {job: jobId};
    if (!before || before.job !== jobId) {
      if (before && !before.job) S.listScroll = window.scrollY;
      closeJob();
      if (jobId) openJob(jobId);
      else if (before && before.job) {
        $("job-view").hidden = true; $("list-view").hidden = false;
        window.scrollTo(0, S.listScroll);
        const row = document.querySelector(`#jobs tr[data-id="${CSS.escape(before.job)}"]`);
        if (row) row.focus({preventScroll: true});
      }
    }
    if (token()) refresh(); else signedOut("Sign in with an API token (trainbox-admin tokens create NAME).");
  }
  window.addEventListener("hashchange", route);

  // ---- a job's page ------------------------------------------------------------------------------
  function openJob(id) {
    $("list-view").hidden = true;
    $("job-view").hidden = false;
    window.scrollTo(0, 0);
    $("job-title").textContent = id;
    for (const el of ["job-state", "job-facts", "job-live", "job-spec", "job-ds", "log"]) $(el).textContent = "";
    $("job-error").hidden = true; $("job-flag").hidden = true; $("job-cancel").hidden = true;
    $("artifacts").textContent = "none yet";
    const job = {id, data: null, dsConfig: null, stream: null, streamState: "connecting", logOffset: 0,
      logBusy: false, logAgain: false, decoder: new TextDecoder(), artifactsAt: 0, gen: S.generation};
    job.charts = new window.TrainboxCharts($("charts"), $("no-steps"), fmt);
    job.charts.setSmoothing(Number($("smooth").value));
    job.charts.setLogScale($("logscale").checked);
    S.job = job;
    $("job-title").focus({preventScroll: true});
    loadHistory(job).then(() => follow(job));
    loadLog(job);
    loadArtifacts(job);
  }

  function closeJob() {
    const job = S.job;
    if (!job) return;
    S.job = null;
    if (job.stream) job.stream.stop();
    job.charts.destroy();
    $("charts").textContent = "";
    $("no-steps").hidden = false;
  }

  function jobMissing(id) {
    if (!S.job || S.job.id !== id) return;
    $("job-title").textContent = `job ${id}`;
    $("job-error").textContent = "no such job, or not yours (only its owner and admins can open it)";
    $("job-error").hidden = false;
  }

  async function loadHistory(job) {
    let after = -1;
    try {
      for (;;) {
        const page = await getJSON(`/jobs/${encodeURIComponent(job.id)}/metrics?limit=10000&after_step=${after}`);
        if (S.job !== job) return;
        let attempt = null;
        for (const row of page.data) {
          if (attempt != null && row.attempt !== attempt) job.charts.addAttempt(row.step);
          attempt = row.attempt;
          // A row may hold only an eval so far (the step's own columns come with its step event).
          if (row.loss == null && row.eval_loss != null) job.charts.addEval(row);
          else job.charts.addStep(row);
        }
        job.lastStep = page.data.length ? page.data[page.data.length - 1].step : job.lastStep;
        if (page.next_after_step == null) break;
        after = page.next_after_step;
      }
    } catch (e) { /* the stream refills what the history missed */ }
  }

  function follow(job) {
    if (S.job !== job) return;
    // History is loaded: `0-0:<last step>` sends the stream's other events and only newer steps.
    job.stream = window.trainboxFollow(`/jobs/${encodeURIComponent(job.id)}/events`, {
      headers: auth,
      after: `0-0:${job.lastStep || 0}`,
      onRejected: rejected,
      onStatus: (st, detail) => { job.streamState = st; job.streamDetail = detail; renderLive(); },
      onEvent: (name, e) => {
        if (S.job !== job) return;
        job.lastEvent = Date.now();
        if (name === "step") { job.charts.addStep(e); liveStep(job, e); }
        else if (name === "eval") { job.charts.addEval(e); liveEval(job, e); }
        else if (name === "checkpoint") { job.charts.addCheckpoint(e.step); loadArtifacts(job); }
        else if (name === "start") {
          if (Number.isInteger(e.total_steps)) job.totalSteps = e.total_steps;
          if (e.deepspeed_config) { job.dsConfig = e.deepspeed_config; renderSpec(job); }
          if (e.resumed_from_step) job.charts.addAttempt(e.resumed_from_step);
        } else if (name === "log") loadLog(job);
        else if (name === "state" || name === "end") {
          refreshSoon();
          if (name === "end" && e.state) { loadLog(job); loadArtifacts(job); }
        }
        renderLive();
      },
    });
  }

  // Steps arrive on the stream before the job's row has them (the worker writes them in batches).
  function liveStep(job, e) {
    const l = job.live || {};
    if (l.step == null || e.step >= l.step) job.live = {...l, ...e};
    if (job.data) renderJob(job.data);
  }
  function liveEval(job, e) {
    job.live = {...(job.live || {}), eval_loss: e.eval_loss};
    if (job.data) renderJob(job.data);
  }

  function renderLive() {
    const job = S.job;
    if (!job) return;
    const flag = job.charts.divergence();
    $("job-flag").hidden = !flag;
    $("job-flag").textContent = flag ? "⚠ " + flag : "";
    const st = job.streamState, last = job.lastEvent ? ` (last event ${Math.round((Date.now() - job.lastEvent) / 1000)} s ago)` : "";
    const words = {live: "following live", connecting: "connecting to the live stream", reconnecting: "live stream lost: reconnecting",
      error: "live stream error: reconnecting", ended: "the job is over: stream closed", gone: "stream unavailable"};
    $("job-live").textContent = (words[st] || st) + (st === "ended" ? "" : last) + (job.streamDetail && st === "error" ? ` (${job.streamDetail})` : "");
  }

  function renderJob(j) {
    const job = S.job;
    if (!job || job.id !== j.id) return;
    job.data = j;
    $("job-title").textContent = `${j.name} (${j.id})`;
    $("job-state").className = "state " + j.state;
    $("job-state").textContent = j.state;
    const err = j.error;
    $("job-error").hidden = !err;
    $("job-error").textContent = err ? `${err.type || "error"}: ${err.message || ""}` + (err.exit_code != null ? ` (exit code ${err.exit_code})` : "") : "";
    $("job-cancel").hidden = !ACTIVE.includes(j.state) || j.state === "cancelling" || j.cancel_requested;
    const p = {...j.progress}, stored = j.latest || {}, live = job.live || {};
    const l = live.step != null && (stored.step == null || live.step > stored.step) ? {...stored, ...live} : {...stored, eval_loss: stored.eval_loss ?? live.eval_loss};
    if (l.step != null && (p.step == null || l.step > p.step)) p.step = l.step;
    if (p.total_steps == null && job.totalSteps) p.total_steps = job.totalSteps;
    if (p.step != null && p.total_steps) p.fraction = p.step / p.total_steps;
    const over = !ACTIVE.includes(j.state);
    let elapsed = null;
    if (j.started_at) elapsed = ((j.finished_at ? Date.parse(j.finished_at) : serverNow()) - Date.parse(j.started_at)) / 1000;
    const facts = [
      ["owner", j.owner],
      ["attempt", `${j.attempt} of ${j.max_attempts}`],
      ["progress", `${p.step ?? 0} / ${p.total_steps ?? "?"} steps` + (p.fraction != null ? ` (${Math.round(p.fraction * 100)}%)` : "")],
      ["submitted", when(j.created_at)],
      ["started", when(j.started_at)],
      ["finished", when(j.finished_at)],
      ["elapsed", elapsed == null ? "-" : dur(elapsed)],
      ["ETA", j.state === "queued" ? (j.start_eta_s != null ? `starts in ~${dur(j.start_eta_s)}` : "start unknown") : (!over && p.eta_s != null ? dur(p.eta_s) + " left" : "-")],
      ["queue position", j.queue_position ?? "-"],
      ["GPUs", `${j.gpus}` + (j.gpu_ids ? ` (ids ${j.gpu_ids.join(", ")})` : "")],
      ["box", j.box || "-"],
      ["priority", j.priority],
      ["loss", fmt(l.loss, 4)],
      ["eval loss", fmt(l.eval_loss, 4)],
      ["tokens/s", fmt(l.tokens_per_s)],
      ["lr", fmt(l.lr, 2)],
      ["MFU", l.mfu == null ? "-" : (100 * l.mfu).toFixed(1) + "%"],
      ["GPU memory", l.gpu_mem_gb == null ? "-" : fmt(l.gpu_mem_gb) + " GB"],
      ["disk", j.disk_bytes == null ? "-" : bytes(j.disk_bytes)],
    ];
    put("job-facts", facts.map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${esc(v)}</dd></div>`).join(""));
    renderSpec(job);
    if (job.logOffset === 0 && !job.logBusy) emptyLog(job);
    // A job that ended while nobody watched its stream: its artifacts may be new.
    if (over && job.artifactsAt < Date.parse(j.finished_at || 0)) loadArtifacts(job);
    renderLive();
  }

  function renderSpec(job) {
    const spec = job.data ? job.data.spec : null;
    $("job-spec").textContent = spec ? JSON.stringify(spec, null, 2) : "";
    const ds = job.dsConfig || (spec && spec.deepspeed);
    $("job-ds").textContent = ds ? (job.dsConfig ? "" : "(as submitted; the resolved config comes with the run's start)\n") + JSON.stringify(ds, null, 2) : "";
  }

  $("job-cancel").addEventListener("click", async () => {
    const job = S.job;
    if (!job || !job.data) return;
    const j = job.data;
    const what = j.state === "queued" ? "It has not started; it leaves the queue."
      : "It is running: it stops now and keeps only what its last checkpoint saved.";
    if (!window.confirm(`Cancel job "${j.name}" (${j.id})?\n${what}`)) return;
    try {
      await request(`/jobs/${encodeURIComponent(j.id)}/cancel`, {method: "POST"});
      $("job-cancel").hidden = true;
    } catch (e) {
      if (!(e instanceof Rejected)) { $("job-error").hidden = false; $("job-error").textContent = "cancel failed: " + e.message; }
    }
    refreshSoon();
  });

  // The whole log from the logs endpoint, then only its new bytes (an HTTP Range request) as the
  // stream says lines arrived: nothing twice, nothing lost, whatever the stream kept.
  async function loadLog(job) {
    if (job.logBusy) { job.logAgain = true; return; }
    job.logBusy = true;
    try {
      do {
        job.logAgain = false;
        const headers = job.logOffset ? {Range: `bytes=${job.logOffset}-`} : {};
        const r = await request(`/jobs/${encodeURIComponent(job.id)}/logs`, {headers, okStatuses: [416]});
        if (S.job !== job) return;
        if (r.status === 416) continue;
        const bytes = new Uint8Array(await r.arrayBuffer());
        const el = $("log"), atEnd = el.scrollHeight - el.scrollTop - el.clientHeight < 30;
        if (r.status === 206) {
          el.append(job.decoder.decode(bytes, {stream: true}));
          job.logOffset += bytes.length;
        } else {
          job.decoder = new TextDecoder();
          el.textContent = job.decoder.decode(bytes, {stream: true});
          job.logOffset = bytes.length;
          if (!bytes.length) emptyLog(job);
        }
        if (atEnd) el.scrollTop = el.scrollHeight;
        // Lines arrive about every second while a job runs: one small request per 1.5 s at most.
        if (ACTIVE.includes(job.data ? job.data.state : "running")) await new Promise((ok) => setTimeout(ok, 1500));
      } while (job.logAgain && S.job === job);
    } catch (e) { /* retried on the next log event */ } finally { job.logBusy = false; }
  }

  // A run that failed before its ranks wrote anything: its log is the launcher's (the job's error keeps its end).
  function emptyLog(job) {
    const tail = job.data && job.data.error && job.data.error.log_tail;
    if (job.logOffset === 0) $("log").textContent = tail ? "train.log is empty; the end of the launcher's output:\n" + tail : "";
  }

  async function loadArtifacts(job) {
    job.artifactsAt = Date.now();
    let a;
    try { a = await getJSON(`/jobs/${encodeURIComponent(job.id)}/artifacts`); } catch (e) { return; }
    if (S.job !== job) return;
    for (const c of a.checkpoints) job.charts.addCheckpoint(c.step);
    const item = (name, label, size) => `<li><button type="button" data-download="${esc(name)}">${esc(label)}</button> <span class="dim">${bytes(size)}</span></li>`;
    let html = "";
    if (a.model.length) html += `<p>final model (Hugging Face format)</p><ul>${a.model.map((f) => item(f.name, f.name, f.size)).join("")}</ul>`;
    if (a.checkpoints.length) html += `<p>checkpoints</p><ul>${a.checkpoints.map((c) => item(c.name, `${c.name} (step ${c.step}, .tar)`, c.size)).join("")}</ul>`;
    $("artifacts").className = html ? "artifacts" : "dim";
    put("artifacts", html || "none yet");
  }

  // Downloads need the bearer header, so they are fetched here and handed to the browser as a blob.
  $("artifacts").addEventListener("click", async (ev) => {
    const b = ev.target.closest("[data-download]");
    if (!b || !S.job) return;
    const name = b.dataset.download, label = b.textContent;
    b.disabled = true; b.textContent = "downloading…";
    try {
      const r = await request(`/jobs/${encodeURIComponent(S.job.id)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`);
      const blob = await r.blob();
      const cd = r.headers.get("content-disposition") || "";
      const m = cd.match(/filename="?([^";]+)"?/);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = m ? m[1] : name.split("/").pop();
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (e) {
      if (!(e instanceof Rejected)) $("notice").textContent = `download of ${name} failed: ${e.message}`;
    } finally { b.disabled = false; b.textContent = label; }
  });

  $("smooth").addEventListener("input", () => {
    $("smooth-value").textContent = $("smooth").value;
    if (S.job) S.job.charts.setSmoothing(Number($("smooth").value));
  });
  $("logscale").addEventListener("change", () => { if (S.job) S.job.charts.setLogScale($("logscale").checked); });

  route();
})();
