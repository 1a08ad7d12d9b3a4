"use strict";
// Server-Sent Events over fetch (EventSource cannot send the Authorization header), with the
// server's one resume protocol: every event id is `<stream id>:<step>`, and a new connection sends
// the last id seen as Last-Event-ID, so nothing is lost or repeated. A stream that ends before the
// job's final `end` (a server restart, a proxy, Redis going away) or that goes quiet for longer than
// its keep-alives allow (the server pings every 10 s) is reconnected, with a growing pause. The
// page is told about each state (`onStatus`), so a stalled stream is never silent.
window.trainboxFollow = function follow(path, {headers, onEvent, onStatus, onRejected, after}) {
  const QUIET_MS = 25000;  // two and a half keep-alive periods without a byte: the connection is dead
  let lastId = after || null, stopped = false, conn = null, lastByte = Date.now(), pause = 1000;
  const watchdog = setInterval(() => {
    if (conn && Date.now() - lastByte > QUIET_MS) conn.abort();
  }, 2000);
  const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

  async function once() {
    conn = new AbortController();
    lastByte = Date.now();
    const h = headers({Accept: "text/event-stream"});
    if (lastId) h["Last-Event-ID"] = lastId;
    const r = await fetch(path, {headers: h, signal: conn.signal, cache: "no-store"});
    if (r.status === 401) { onRejected(); return true; }
    if (r.status === 404) { onStatus("gone"); return true; }
    if (!r.ok || !r.body) { onStatus("error", "HTTP " + r.status); return false; }
    onStatus("live");
    pause = 1000;
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", name = "message", data = [], id = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return false;
      lastByte = Date.now();
      buf += value;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, "");
        buf = buf.slice(i + 1);
        if (line === "") {
          if (data.length) {
            if (id) lastId = id;
            let event = null;
            try { event = JSON.parse(data.join("\n")); } catch (e) { event = null; }
            if (event) {
              onEvent(name, event);
              if (name === "end" && event.state) return true;  // the API's final event: the job is over
            }
          }
          name = "message"; data = []; id = null;
        } else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("id:")) id = line.slice(3).trim();
        // a line starting with ':' is a keep-alive: it only proves the connection lives
      }
    }
  }

  (async () => {
    while (!stopped) {
      let finished = false;
      try { finished = await once(); } catch (e) { if (stopped) break; }
      conn = null;
      if (finished || stopped) break;
      onStatus("reconnecting");
      await sleep(pause);
      pause = Math.min(pause * 2, 5000);
    }
    clearInterval(watchdog);
    if (!stopped) onStatus("ended");
  })();

  return {stop() { stopped = true; clearInterval(watchdog); if (conn) conn.abort(); }, lastByte: () => lastByte};
};
