// P9's editors (docs/benchmarks.md): stock Yjs clients in one Node.js process —
// `yjs` + `y-websocket`'s WebsocketProvider over `ws` for ringfeed and the y-websocket
// server, `@hocuspocus/provider` for Hocuspocus (whose protocol prefixes every message
// with the document's name, which the stock client does not) — driven by
// ringfeed-bench. Every editor has its own Y.Doc and its own WebSocket. Reports JSON
// lines on stdout ({"ev": …}); reads commands (`go`, `verify`, `stop`) on stdin.
//
//   node editors.mjs fanout  --kind yws|hocuspocus --urls U[,U…] --room R --editors N [--base B]
//                            [--writer 1] --rounds K [--interval-ms I] [--warmup W]
//       N editors (editor i on URL (B + i) mod the list) open document R, and with
//       --writer 1 one more, the writer (on the first URL). Prints `connected`; on `go`
//       the writer sets a Y.Map key every I ms to {seq, t}: the round's number and the
//       Unix time it was sent (performance.timeOrigin + performance.now(), µs
//       precision: the clock every process on the box agrees on), W unrecorded rounds
//       then K; every editor records when each round reached it. The writer prints
//       `sent` after the last; on the next command each process prints `done`: per
//       round how many of its editors got it and the latest of their times, every
//       receipt, and each editor's p50 / p99 (µs). Several processes can share a
//       document's editors (one of them the writer): their rounds line up by number.
//   node editors.mjs open    --kind … --url U --prefix P --docs N --text-bytes B
//       N documents P-0 … P-(N-1), one editor each; with B > 0 each editor, once
//       synced, puts B bytes of text into its document (one update). Prints `opened`,
//       then waits: `verify` opens a fresh editor on the first and the last document
//       and says whether the server gave each the whole text (`verified`).
//   node editors.mjs handoff --url U --room R --text-bytes B --routes H[,H…] --drained ID [--deadline-ms D]
//       Puts B bytes of text into R through one editor (connected to U), checks with a
//       fresh editor that the server holds all of it, closes both (`filled`). On `go`:
//       asks /v1/route of the nodes H (in turn) who owns doc:R; once that is not ID,
//       opens a fresh editor on the owner's /v1/doc and waits until it is synced; if
//       the text is not the whole text, closes it and tries again. Prints `served`
//       (with the time, Unix ns) once a fresh editor got all of it, or `lost` with what
//       the last one got when D ms (default 10,000) passed.
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import { HocuspocusProvider } from "@hocuspocus/provider";
import WebSocket from "ws";
import readline from "node:readline";
import { performance } from "node:perf_hooks";

const [mode, ...rest] = process.argv.slice(2);
const opt = {};
for (let i = 0; i < rest.length; i += 2) opt[rest[i].replace(/^--/, "")] = rest[i + 1];
const kind = opt.kind || "yws";

// Every Hocuspocus provider listens for the process's exit.
process.setMaxListeners(0);
const say = (ev, fields = {}) => process.stdout.write(JSON.stringify({ ev, ...fields }) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const unixMs = () => performance.timeOrigin + performance.now();
const nowNs = () => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6)).toString();

// Commands from ringfeed-bench, one per line.
const commands = [];
let waiting = null;
readline
  .createInterface({ input: process.stdin })
  .on("line", (line) => {
    commands.push(line.trim());
    if (waiting) waiting();
  })
  .on("close", () => {
    // Nobody to say more: as good as `stop`.
    commands.push("stop");
    if (waiting) waiting();
  });
const command = async () => {
  while (commands.length === 0) await new Promise((r) => (waiting = r));
  waiting = null;
  return commands.shift();
};

// One editor: a Y.Doc with a provider of the kind asked for. `synced` resolves once the
// server's state arrived (sync step 2); `closed` rejects once a connection closed or
// failed (the provider itself goes on reconnecting).
function editor(url, room, doc = new Y.Doc()) {
  let provider;
  const e = { doc };
  let closed;
  e.closed = new Promise((_, reject) => (closed = () => reject(new Error("connection closed"))));
  e.closed.catch(() => {});
  e.synced = new Promise((resolve) => {
    if (kind === "hocuspocus") {
      provider = new HocuspocusProvider({
        url,
        name: room,
        document: doc,
        WebSocketPolyfill: WebSocket,
        onSynced: () => resolve(),
        onClose: () => closed(),
      });
    } else {
      // disableBc: Node.js has a BroadcastChannel, through which editors in one process
      // would otherwise reach each other without the server.
      provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true });
      provider.on("sync", (synced) => synced && resolve());
      provider.on("connection-close", () => closed());
      provider.on("connection-error", () => closed());
    }
  });
  e.provider = provider;
  e.destroy = () => {
    try {
      provider.destroy();
    } catch {}
    doc.destroy();
  };
  return e;
}

const within = (promise, ms, what) =>
  Promise.race([promise, sleep(ms).then(() => Promise.reject(new Error(`${what}: not within ${ms} ms`)))]);

// Opens `count` editors with at most `parallel` connecting at a time.
async function openAll(count, make, parallel = 32) {
  const out = new Array(count);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      out[i] = make(i);
      await within(out[i].synced, 60000, `editor ${i} synced`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, count) }, worker));
  return out;
}

// `bytes` of text as an update: 1 KiB pieces inserted at pseudo-random places (a fixed
// seed), so the document has the many items of one that was typed, not one long string.
function textUpdate(bytes) {
  const doc = new Y.Doc();
  const text = doc.getText("t");
  let seed = 42;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const piece = 1024;
  for (let written = 0; written < bytes; written += piece) {
    const n = Math.min(piece, bytes - written);
    let s = "";
    for (let i = 0; i < n; i++) s += String.fromCharCode(97 + Math.floor(rnd() * 26));
    text.insert(Math.floor(rnd() * (text.length + 1)), s);
  }
  return { update: Y.encodeStateAsUpdate(doc), length: text.length, content: text.toString() };
}

async function fanout() {
  const urls = opt.urls.split(",");
  const n = Number(opt.editors);
  const base = Number(opt.base ?? 0);
  const writes = opt.writer === "1";
  const rounds = Number(opt.rounds);
  const warmup = Number(opt.warmup ?? 10);
  const interval = Number(opt["interval-ms"] ?? 50);
  const room = opt.room;
  // received[i][r]: editor i's latency for round r (µs), 0 until it arrives.
  const received = Array.from({ length: n }, () => new Float64Array(warmup + rounds + 1));
  const editors = await openAll(n, (i) => {
    const e = editor(urls[(base + i) % urls.length], room);
    const m = e.doc.getMap("m");
    e.doc.on("update", () => {
      const at = unixMs();
      const s = m.get("s");
      if (s && s.seq < received[i].length && received[i][s.seq] === 0) {
        received[i][s.seq] = Math.max(1, Math.round((at - s.t) * 1000));
      }
    });
    return e;
  });
  const writer = writes ? editor(urls[0], room) : null;
  if (writer) await within(writer.synced, 60000, "the writer synced");
  say("connected", { n, writer: writes });
  if ((await command()) !== "go") return;
  if (writer) {
    // Let the editors' awareness announcements (each to every editor) pass.
    await sleep(500);
    const wm = writer.doc.getMap("m");
    const start = performance.now();
    for (let r = 1; r <= warmup + rounds; r++) {
      wm.set("s", { seq: r, t: unixMs() });
      const next = start + r * interval;
      await sleep(Math.max(0, next - performance.now()));
    }
    say("sent", { rounds: warmup + rounds });
  }
  await command();
  const quantile = (v, q) => {
    if (v.length === 0) return null;
    const s = [...v].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)];
  };
  const got = [];
  const max = [];
  const all = [];
  const perEditor = received.map((lat) => Array.from(lat.subarray(warmup + 1)).filter((v) => v > 0));
  for (let r = warmup + 1; r <= warmup + rounds; r++) {
    let g = 0;
    let m = 0;
    for (let i = 0; i < n; i++) {
      const v = received[i][r];
      if (v > 0) {
        g++;
        all.push(v);
        if (v > m) m = v;
      }
    }
    got.push(g);
    max.push(m);
  }
  say("done", {
    editors: n,
    rounds,
    got,
    max_us: max,
    all_us: all,
    per_editor_p50_us: perEditor.map((v) => quantile(v, 0.5)),
    per_editor_p99_us: perEditor.map((v) => quantile(v, 0.99)),
  });
  for (const e of writer ? [...editors, writer] : editors) e.destroy();
}

async function open() {
  const n = Number(opt.docs);
  const bytes = Number(opt["text-bytes"] || 0);
  const content = bytes > 0 ? textUpdate(bytes) : null;
  const editors = await openAll(n, (i) => editor(opt.url, `${opt.prefix}-${i}`));
  if (content) {
    for (const e of editors) Y.applyUpdate(e.doc, content.update);
  }
  say("opened", { docs: n, text_bytes: content ? content.length : 0 });
  for (;;) {
    const c = await command();
    if (c === "verify") {
      // A server still applying what it was sent gets a few tries (within 30 s).
      const want = content ? content.length : 0;
      const seen = [];
      for (const i of [...new Set([0, n - 1])]) {
        let length = -1;
        for (const until = Date.now() + 30000; length !== want && Date.now() < until; ) {
          const e = editor(opt.url, `${opt.prefix}-${i}`);
          try {
            await within(e.synced, Math.max(1, until - Date.now()), "a fresh editor synced");
            length = e.doc.getText("t").length;
          } catch {}
          e.destroy();
          if (length !== want) await sleep(200);
        }
        seen.push(length);
      }
      say("verified", { ok: seen.every((l) => l === want), seen, want });
    } else if (c === "stop" || c === undefined) {
      break;
    }
  }
  for (const e of editors) e.destroy();
  say("done", { docs: n });
}

async function handoff() {
  const bytes = Number(opt["text-bytes"]);
  const deadline = Number(opt["deadline-ms"] ?? 10000);
  const { update, length, content } = textUpdate(bytes);
  const filler = editor(opt.url, opt.room);
  await within(filler.synced, 30000, "the filling editor synced");
  Y.applyUpdate(filler.doc, update);
  // The server holds it all once a fresh editor gets it all.
  let held = -1;
  for (const until = Date.now() + 30000; Date.now() < until; ) {
    const check = editor(opt.url, opt.room);
    try {
      await within(check.synced, 10000, "a fresh editor synced");
      held = check.doc.getText("t").length;
    } catch {}
    check.destroy();
    if (held === length) break;
    await sleep(50);
  }
  filler.destroy();
  if (held !== length) {
    say("error", { error: `the server held ${held} of ${length} characters before the drain` });
    return;
  }
  say("filled", { chars: length, update_bytes: update.length });
  if ((await command()) !== "go") return;
  const started = performance.now();
  const routes = opt.routes.split(",");
  let attempts = 0;
  let lastSeen = null;
  let lastOwner = null;
  let lastError = null;
  for (let k = 0; performance.now() - started < deadline; k++) {
    let owner;
    try {
      const answer = await fetch(`${routes[k % routes.length]}/v1/route?key=doc:${opt.room}`, {
        signal: AbortSignal.timeout(1000),
      });
      owner = (await answer.json()).owner;
    } catch (e) {
      lastError = `route: ${e.message}`;
      await sleep(5);
      continue;
    }
    if (!owner || owner.id === opt.drained) {
      await sleep(5);
      continue;
    }
    attempts++;
    lastOwner = owner.id;
    const e = editor(`${owner.ws}/v1/doc`, opt.room);
    const left = deadline - (performance.now() - started);
    try {
      // A refused or closed connection is a failed try at once, not a wait.
      await within(Promise.race([e.synced, e.closed]), Math.max(1, Math.min(2000, left)), "synced");
      const text = e.doc.getText("t").toString();
      lastSeen = text.length;
      if (text === content) {
        say("served", { at_ns: nowNs(), attempts, owner: owner.id, chars: text.length });
        e.destroy();
        return;
      }
    } catch (err) {
      lastError = err.message;
    }
    e.destroy();
    await sleep(20);
  }
  say("lost", { attempts, owner: lastOwner, seen_chars: lastSeen, want_chars: length, error: lastError });
}

const modes = { fanout, open, handoff };
if (!modes[mode]) {
  console.error(`usage: node editors.mjs fanout|open|handoff …`);
  process.exit(64);
}
try {
  await modes[mode]();
} catch (e) {
  say("error", { error: e.message });
  process.exitCode = 1;
}
// stdout to a pipe is written asynchronously: exit once what was said is out (a
// large `done` line would otherwise be cut off).
process.stdout.write("", () => process.exit());
