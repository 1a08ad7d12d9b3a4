"use strict";
// A job's charts (uPlot, vendored): loss with its smoothing and eval loss, tokens/s, learning rate,
// GPU memory. Hovering one chart shows every chart's values at that step (synced cursors, legends);
// dashed markers show checkpoints and restarts (attempts). Rows are keyed by step, so a step that
// arrives twice (history, then the stream) is drawn once.
window.TrainboxCharts = class {
  constructor(container, empty, fmt) {
    this.container = container; this.empty = empty; this.fmt = fmt;
    this.rows = new Map(); this.checkpoints = new Set(); this.attempts = new Set();
    this.smoothing = 0.6; this.logScale = false; this.plots = []; this.queued = false;
    this.onResize = () => this.resize();
    window.addEventListener("resize", this.onResize);
  }

  add(row) {
    if (!Number.isInteger(row.step)) return;
    const old = this.rows.get(row.step) || {step: row.step};
    for (const [k, v] of Object.entries(row)) if (v !== undefined && !(v === null && k === "eval_loss")) old[k] = v;
    this.rows.set(row.step, old);
    this.schedule();
  }
  addStep(m) { this.add({...m, isStep: true}); }
  addEval(e) { this.add({step: e.step, eval_loss: e.eval_loss}); }
  addCheckpoint(step) { if (Number.isInteger(step)) { this.checkpoints.add(step); this.schedule(); } }
  addAttempt(step) { if (Number.isInteger(step)) { this.attempts.add(step); this.schedule(); } }
  setSmoothing(a) { this.smoothing = a; this.schedule(); }
  setLogScale(on) { this.logScale = on; this.destroyPlots(); this.schedule(); }

  schedule() {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => { this.queued = false; this.draw(); });
  }

  steps() { return [...this.rows.values()].filter((r) => r.isStep).sort((a, b) => a.step - b.step); }

  data() {
    const rows = [...this.rows.values()].sort((a, b) => a.step - b.step);
    const a = this.smoothing, col = (k) => rows.map((r) => (typeof r[k] === "number" && isFinite(r[k]) ? r[k] : null));
    const loss = col("loss");
    let s = 0, n = 0;
    const smooth = loss.map((v) => { if (v == null) return null; n++; s = a * s + (1 - a) * v; return s / (1 - a ** n); });
    return [rows.map((r) => r.step), loss, smooth, col("eval_loss"), col("tokens_per_s"), col("lr"), col("gpu_mem_gb")];
  }

  // A run whose loss went non-finite, or rose sharply (its smoothed loss over 3x its lowest), is flagged.
  divergence() {
    const steps = this.steps();
    const bad = steps.find((r) => r.loss === null || (typeof r.loss === "number" && !isFinite(r.loss)));
    if (bad) return `loss not finite at step ${bad.step}`;
    let s = 0, n = 0, low = Infinity, lowStep = null, rose = false;
    for (const r of steps) {
      if (typeof r.loss !== "number") continue;
      n++; s = 0.8 * s + 0.2 * r.loss;
      if (r.loss < low) { low = r.loss; lowStep = r.step; }
      rose = rose || (n >= 3 && low > 0 && s / (1 - 0.8 ** n) > 3 * low);
    }
    const last = steps[steps.length - 1];
    if (rose) return `loss diverged: ${this.fmt(low)} at step ${lowStep}, ${this.fmt(last.loss)} at step ${last.step}`;
    return null;
  }

  markers() {
    const css = getComputedStyle(document.documentElement);
    return [...[...this.checkpoints].map((s) => [s, css.getPropertyValue("--ok")]),
      ...[...this.attempts].map((s) => [s, css.getPropertyValue("--warn")])];
  }

  build() {
    const fg = "#dde3ea", grid = "#2f3742", fmt = this.fmt, self = this;
    const value = (u, v) => (v == null ? "-" : fmt(v));
    const steps = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
    const axes = () => [
      {stroke: fg, grid: {stroke: grid, width: 1}, ticks: {stroke: grid, width: 1}, incrs: steps},
      {stroke: fg, grid: {stroke: grid, width: 1}, ticks: {stroke: grid, width: 1}, size: 58, values: (u, vs) => vs.map((v) => fmt(v))},
    ];
    const markers = {hooks: {draw: [(u) => {
      const {left, top, width, height} = u.bbox, ctx = u.ctx;
      ctx.save(); ctx.setLineDash([5, 4]); ctx.lineWidth = 2 * (window.devicePixelRatio || 1);
      for (const [step, color] of self.markers()) {
        const x = Math.round(u.valToPos(step, "x", true));
        if (x < left || x > left + width) continue;
        ctx.strokeStyle = color.trim(); ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      }
      ctx.restore();
    }]}};
    const specs = [
      ["loss", [
        {label: "loss", stroke: "rgba(108,180,255,0.35)", width: 1, value},
        {label: "smoothed", stroke: "#6cb4ff", width: 2, value},
        {label: "eval loss", stroke: "#f5c15a", width: 2, value, spanGaps: true, points: {show: true, size: 7, fill: "#f5c15a"}},
      ], [1, 2, 3], this.logScale],
      ["tokens/s", [{label: "tokens/s", stroke: "#4fd89a", width: 2, value}], [4], false],
      ["learning rate", [{label: "lr", stroke: "#c9a0ff", width: 2, value}], [5], false],
      ["GPU memory (GB, peak)", [{label: "GB", stroke: "#ff9f6b", width: 2, value}], [6], false],
    ];
    this.container.textContent = "";
    this.plots = specs.map(([title, series, cols, log]) => {
      const box = document.createElement("div");
      box.className = "chart";
      const h = document.createElement("h3");
      h.textContent = title;
      h.dataset.title = title;
      box.append(h);
      this.container.append(box);
      const opts = {
        width: Math.max(box.clientWidth, 200), height: 190,
        cursor: {sync: {key: "trainbox-job"}, drag: {x: true, y: false}},
        scales: {x: {time: false}, y: log ? {distr: 3} : {}},
        axes: axes(), series: [{label: "step", value: (u, v) => (v == null ? "-" : String(v))}, ...series],
        plugins: [markers],
      };
      const plot = new uPlot(opts, [[], ...series.map(() => [])], box);
      return {plot, cols, box};
    });
  }

  draw() {
    const data = this.data(), n = this.steps().length;
    this.container.dataset.steps = String(n);
    this.container.dataset.evals = String(data[3].filter((v) => v != null).length);
    this.container.dataset.markers = `${this.checkpoints.size} checkpoints, ${this.attempts.size} restarts`;
    this.empty.hidden = data[0].length > 0;
    if (!data[0].length || typeof uPlot === "undefined") return;
    if (!this.plots.length) this.build();
    for (const {plot, cols, box} of this.plots) {
      plot.setData([data[0], ...cols.map((c) => data[c])]);
      // Off the chart, the legend shows the newest values; hovering shows those of the step under the cursor.
      if (plot.cursor.idx == null) plot.setLegend({idx: data[0].length - 1});
      const h = box.querySelector("h3"), none = cols.every((c) => data[c].every((v) => v == null));
      h.textContent = h.dataset.title + (none ? " (not reported by this run)" : "");
    }
  }

  resize() { for (const {plot, box} of this.plots) plot.setSize({width: Math.max(box.clientWidth, 200), height: 190}); }
  destroyPlots() { for (const {plot} of this.plots) plot.destroy(); this.plots = []; this.container.textContent = ""; }
  destroy() { this.destroyPlots(); window.removeEventListener("resize", this.onResize); this.rows.clear(); }
};
