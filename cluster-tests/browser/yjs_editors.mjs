// Stock y-websocket editors (npm `yjs` + `y-websocket` over `ws`), driven by a test
// over stdin/stdout: one JSON command a line in, one JSON answer a line out.
//
//   {"cmd":"open","name":"a","url":"ws://127.0.0.1:8001/v1/doc","room":"r"}  → synced
//   {"cmd":"edit","name":"a","every_ms":10}   start editing: each step inserts a token
//       `${name}${i};` into Y.Text "t" (at the start or the end) and sets key
//       `${name}${i}` in Y.Map "m"; every 7th step deletes an earlier token of its own
//   {"cmd":"stop","name":"a"}                 stop editing
//   {"cmd":"big","name":"a","chars":N}       one insert of N characters (one update)
//   {"cmd":"acked","name":"a","by":"b"}       the tokens of a that b has seen (what went
//       through the server), as {"acked":[…]}
//   {"cmd":"converge","names":["a","b"],"timeout_ms":30000,"must":[tokens]}
//       waits until every named editor has the same text, holding every token its
//       writers still keep (and those of `must` no editor here deleted since), and
//       none they deleted
//   {"cmd":"wait","name":"a","contains":[tokens],"timeout_ms":N}
//   {"cmd":"state","name":"a"}                → {"text","map","connected","synced"}
//   {"cmd":"close","name":"a"}
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";
import * as readline from "node:readline";

const editors = new Map();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (what, timeoutMs, check) => {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
};

function open({ name, url, room }) {
  const doc = new Y.Doc();
  const provider = new WebsocketProvider(url, room, doc, {
    WebSocketPolyfill: WebSocket,
    maxBackoffTime: 1000,
    // Editors in one process would otherwise sync through a BroadcastChannel, around
    // the server.
    disableBc: true,
  });
  provider.awareness.setLocalStateField("user", { name });
  const editor = { name, doc, provider, kept: new Set(), deleted: new Set(), step: 0, timer: null };
  editors.set(name, editor);
  return editor;
}

function step(e) {
  const i = e.step++;
  const token = `${e.name}${i};`;
  const t = e.doc.getText("t");
  if (i % 7 === 6 && e.kept.size > 0) {
    // Delete an earlier token of our own, if it is where we can find it.
    const victim = [...e.kept][0];
    const at = t.toString().indexOf(victim);
    if (at >= 0) {
      t.delete(at, victim.length);
      e.kept.delete(victim);
      e.deleted.add(victim);
    }
  }
  if (i % 2 === 0) t.insert(0, token);
  else t.insert(t.length, token);
  e.kept.add(token);
  e.doc.getMap("m").set(`${e.name}${i}`, i);
}

function state(e) {
  return {
    text: e.doc.getText("t").toString(),
    map: e.doc.getMap("m").size,
    connected: e.provider.wsconnected,
    synced: e.provider.synced,
    steps: e.step,
    kept: e.kept.size,
  };
}

async function handle(c) {
  const e = editors.get(c.name);
  switch (c.cmd) {
    case "open": {
      const opened = open(c);
      await until(`${c.name} to sync`, c.timeout_ms ?? 20000, () => opened.provider.synced);
      return { ok: true };
    }
    case "edit":
      e.timer = setInterval(() => step(e), c.every_ms ?? 10);
      return { ok: true };
    case "big": {
      // One update of `chars` characters (past the payload limit of ordinary keys).
      const token = `${e.name}-big${e.step++};`;
      e.doc.getText("t").insert(0, token + "x".repeat(c.chars));
      e.kept.add(token);
      return { ok: true };
    }
    case "steps":
      for (let i = 0; i < c.n; i++) step(e);
      return { ok: true };
    case "stop":
      clearInterval(e.timer);
      e.timer = null;
      return { ok: true, steps: e.step };
    case "acked": {
      const seen = editors.get(c.by).doc.getText("t").toString();
      return { acked: [...e.kept].filter((t) => seen.includes(t)) };
    }
    case "converge": {
      const group = c.names.map((n) => editors.get(n));
      // What an editor deleted after it was acknowledged is no longer a must.
      const deleted = new Set([...editors.values()].flatMap((g) => [...g.deleted]));
      const must = (c.must ?? []).filter((t) => !deleted.has(t));
      const good = () => {
        const texts = group.map((g) => g.doc.getText("t").toString());
        if (texts.some((t) => t !== texts[0])) return false;
        for (const g of group) {
          for (const t of g.kept) if (!texts[0].includes(t)) return false;
          for (const t of g.deleted) if (texts[0].includes(t)) return false;
        }
        return must.every((t) => texts[0].includes(t));
      };
      try {
        await until("convergence", c.timeout_ms ?? 30000, good);
      } catch (err) {
        return { ok: false, error: err.message, states: group.map(state) };
      }
      return { ok: true, text: group[0].doc.getText("t").toString() };
    }
    case "wait":
      try {
        await until(`${c.name} to see ${c.contains}`, c.timeout_ms ?? 20000, () => {
          const text = e.doc.getText("t").toString();
          return c.contains.every((t) => text.includes(t));
        });
      } catch (err) {
        return { ok: false, error: err.message, state: state(e) };
      }
      return { ok: true, text: e.doc.getText("t").toString() };
    case "state":
      return state(e);
    case "close":
      clearInterval(e.timer);
      e.provider.destroy();
      editors.delete(c.name);
      return { ok: true };
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    answer = await handle(JSON.parse(line));
  } catch (err) {
    answer = { ok: false, error: String(err?.message ?? err) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
for (const e of editors.values()) e.provider.destroy();
process.exit(0);
