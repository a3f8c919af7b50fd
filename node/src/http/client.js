// ringfeed's browser client, served by every node at GET /client.js (an ES module).
//
//   import { subscribe } from "http://NODE/client.js";
//   const sub = subscribe("http://NODE", "user:42", {
//     onUpdate: (frame) => console.log(frame.seq, frame.data),
//   });
//   await sub.publish({ hello: "world" });   // over WebSocket, answered once replicated
//   sub.close();
//
// It connects over WebSocket to any node and follows `redirect` frames to the key's
// owner; it falls back to Server-Sent Events (which follow 307s by themselves) when
// WebSocket cannot connect. After any disconnect it reconnects with full-jitter
// exponential back-off, resuming with `since`/`epoch` so that no update is missed or
// delivered twice; it acts on each close code as docs/protocol.md says (4300: follow
// the redirect at once; 4429: the advised delay; 4408 and 1008: a pause; 4503, 1001
// and a dropped connection: try again; 4400, 4401 and 4413: stop, with onError).
// Heartbeats are answered by the browser itself (WebSocket pings). With tickets on,
// give `ticket`; the `resume` token `welcome` hands back replaces it on reconnects.

const FINAL = new Set([4400, 4401, 4413]);

/** Full jitter: a uniform pause below min(cap, base × 2^attempt), in ms. */
function backoff(attempt, base = 100, cap = 5000) {
  return Math.random() * Math.min(cap, base * 2 ** Math.min(attempt, 16));
}

function wsBase(node) {
  return node.replace(/^http:/, "ws:").replace(/^https:/, "wss:").replace(/\/$/, "");
}

function httpBase(node) {
  return node.replace(/^ws:/, "http:").replace(/^wss:/, "https:").replace(/\/$/, "");
}

/**
 * Follows `key` from the node at `node` (its http(s):// or ws(s):// base URL).
 * Options: since, epoch, ticket, presence, transport ("auto" | "ws" | "sse"),
 * onUpdate(frame), onReset(frame), onPresence(frame), onState({state, node, code,
 * reason, retryInMs, transport}), onError(error).
 */
export function subscribe(node, key, options = {}) {
  const o = { transport: "auto", ...options };
  let seq = o.since ?? null;
  let epoch = o.epoch ?? null;
  let resume = null;
  let redirect = null;
  let attempt = 0;
  let closed = false;
  let useSse = o.transport === "sse";
  let socket = null;
  let source = null;
  let timer = null;
  let nextId = 1;
  // Whether a WebSocket ever opened: only a subscription whose WebSocket never got
  // through falls back to Server-Sent Events (a dead node is not a blocked network).
  let wsWorked = false;
  const waiting = new Map();

  const state = (s) => o.onState && o.onState(s);

  function query() {
    const q = new URLSearchParams({ key });
    if (seq !== null) q.set("since", String(seq));
    if (seq !== null && epoch) q.set("epoch", epoch);
    if (o.presence) q.set("presence", "1");
    if (resume) q.set("resume", resume);
    else if (o.ticket) q.set("ticket", o.ticket);
    return q;
  }

  function frame(f) {
    switch (f.type) {
      case "welcome":
        attempt = 0;
        if (epoch !== null && epoch !== f.epoch) epoch = f.epoch;
        if (seq === null) seq = f.seq;
        epoch = f.epoch;
        if (f.resume) resume = f.resume;
        state({ state: "open", node: f.node, transport: useSse ? "sse" : "ws" });
        break;
      case "update":
        // Nothing twice: anything at or before our position is dropped.
        if (seq !== null && f.seq <= seq) return;
        seq = f.seq;
        o.onUpdate && o.onUpdate(f);
        break;
      case "reset":
        epoch = f.epoch;
        seq = f.seq;
        o.onReset && o.onReset(f);
        break;
      case "presence":
        o.onPresence && o.onPresence(f);
        break;
      case "redirect": {
        // Go where it says, with our own position.
        const url = new URL(f.url);
        const q = query();
        if (f.ring_version !== undefined) q.set("rv", String(f.ring_version));
        url.search = q.toString();
        redirect = url.toString();
        break;
      }
      case "ack":
      case "nack": {
        const w = waiting.get(f.id);
        if (w) {
          waiting.delete(f.id);
          f.type === "ack" ? w.resolve({ seq: f.seq }) : w.reject(new Error(`${f.code}: ${f.message}`));
        }
        break;
      }
      default:
        break;
    }
  }

  function lost(code, reason) {
    socket = null;
    for (const w of waiting.values()) w.reject(new Error("disconnected"));
    waiting.clear();
    if (closed) return;
    if (FINAL.has(code)) {
      closed = true;
      state({ state: "closed", code, reason });
      o.onError && o.onError(new Error(`closed ${code}: ${reason}`));
      return;
    }
    let wait;
    if (code === 4300 && redirect) wait = 0;
    else if (code === 4429) {
      const m = /retry_after_ms=(\d+)/.exec(reason || "");
      wait = m ? Number(m[1]) : backoff(attempt++);
    } else if (code === 4408 || code === 1008) wait = Math.max(1000, backoff(attempt++));
    else {
      redirect = null;
      wait = backoff(attempt++);
    }
    state({ state: "reconnecting", code, reason, retryInMs: wait });
    timer = setTimeout(connect, wait);
  }

  function connectSse() {
    useSse = true;
    const url = `${httpBase(node)}/v1/sse?${query()}`;
    source = new EventSource(url);
    source.onmessage = (event) => frame(JSON.parse(event.data));
    source.onerror = () => {
      // EventSource reconnects by itself, but with the position it saw last: ours is
      // newer, so reconnect ourselves.
      source.close();
      source = null;
      if (!closed) {
        const wait = backoff(attempt++);
        state({ state: "reconnecting", code: 1006, reason: "event stream lost", retryInMs: wait });
        timer = setTimeout(connect, wait);
      }
    };
  }

  function connect() {
    timer = null;
    if (closed) return;
    if (useSse) return connectSse();
    const url = redirect || `${wsBase(node)}/v1/connect?${query()}`;
    redirect = null;
    let opened = false;
    try {
      socket = new WebSocket(url);
    } catch (e) {
      // No WebSocket here (blocked, or not allowed): Server-Sent Events instead.
      if (o.transport === "auto") return connectSse();
      return lost(1006, String(e));
    }
    socket.onopen = () => { opened = true; wsWorked = true; };
    socket.onmessage = (event) => frame(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (!opened && !wsWorked && o.transport === "auto" && attempt >= 2) {
        // WebSocket never got through: fall back to Server-Sent Events.
        useSse = true;
      }
      lost(event.code || 1006, event.reason || "");
    };
  }

  connect();

  return {
    /** Publishes `data` (JSON) on the key, over WebSocket: resolves with its seq. */
    publish(data) {
      if (!socket || socket.readyState !== WebSocket.OPEN) {
        return Promise.reject(new Error(useSse ? "publishing needs WebSocket" : "not connected"));
      }
      const id = `c${nextId++}`;
      return new Promise((resolve, reject) => {
        waiting.set(id, { resolve, reject });
        socket.send(JSON.stringify({ type: "publish", id, data }));
      });
    },
    /** The last seq seen and its epoch. */
    get position() {
      return { seq, epoch };
    },
    /** Stops for good. */
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      if (socket) socket.close(1000);
      if (source) source.close();
    },
  };
}
