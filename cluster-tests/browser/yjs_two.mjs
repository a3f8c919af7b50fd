// Two stock y-websocket clients (npm `yjs` + `y-websocket` over `ws`) edit one document
// concurrently — inserts and deletes in a Y.Text, keys in a Y.Map — and wait until
// both see the same content.
// usage: node yjs_two.mjs SERVER_URL_A SERVER_URL_B ROOM N TIMEOUT_MS
//   (SERVER_URL is e.g. ws://127.0.0.1:8001/v1/doc; the provider appends /ROOM)
// prints {"a":…,"b":…,"mapA":…,"mapB":…,"converged":…}; exit 0 when converged
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";

const [urlA, urlB, room, nArg, timeoutArg] = process.argv.slice(2);
const n = Number(nArg);
const deadline = Date.now() + Number(timeoutArg);

function client(url) {
  const doc = new Y.Doc();
  // disableBc: two providers in one process would otherwise sync through a
  // BroadcastChannel, around the server.
  const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true });
  provider.awareness.setLocalStateField("user", { name: url });
  return { doc, provider };
}

const until = async (what, check) => {
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
};

const a = client(urlA);
const b = client(urlB);
let code = 1;
try {
  await until("both to sync", () => a.provider.synced && b.provider.synced);
  const ta = a.doc.getText("t");
  const tb = b.doc.getText("t");
  for (let i = 0; i < n; i++) {
    ta.insert(0, `a${i};`);
    tb.insert(tb.length, `b${i};`);
    a.doc.getMap("m").set(`a${i}`, i);
    b.doc.getMap("m").set(`b${i}`, i);
  }
  // A delete on each side: the first token a wrote, the last b wrote.
  ta.delete(0, `a${n - 1};`.length);
  tb.delete(tb.length - `b${n - 1};`.length, `b${n - 1};`.length);
  const expected = (text) => {
    for (let i = 0; i < n - 1; i++) {
      if (!text.includes(`a${i};`) || !text.includes(`b${i};`)) return false;
    }
    return !text.includes(`a${n - 1};`) && !text.includes(`b${n - 1};`);
  };
  await until("convergence", () => {
    const [x, y] = [ta.toString(), tb.toString()];
    return x === y && expected(x) && a.doc.getMap("m").size === 2 * n && b.doc.getMap("m").size === 2 * n;
  });
  // Each sees the other's awareness state.
  await until("awareness", () => a.provider.awareness.getStates().size >= 2 && b.provider.awareness.getStates().size >= 2);
  code = 0;
} catch (e) {
  console.error(e.message);
} finally {
  console.log(JSON.stringify({
    a: a.doc.getText("t").toString(), b: b.doc.getText("t").toString(),
    mapA: a.doc.getMap("m").size, mapB: b.doc.getMap("m").size, converged: code === 0,
  }));
  a.provider.destroy();
  b.provider.destroy();
  process.exit(code);
}
