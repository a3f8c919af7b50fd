// A page in Debian's headless Chromium (doc.html: stock yjs + y-websocket as ES modules)
// and a Node.js client (stock yjs + y-websocket over ws) open one document, each through
// the node given to it; each, once synced, inserts its token at the start of the Y.Text
// "text" and sets its key in the Y.Map "map". Waits until both see both edits and the
// same text. What each side saw is printed also when they did not get there, for the
// test to say what went wrong.
// usage: node doc.mjs PAGE_URL NODE_SERVER_URL ROOM TIMEOUT_MS
//   (PAGE_URL carries the page's own server and room; NODE_SERVER_URL is e.g.
//   ws://127.0.0.1:8001/v1/doc, to which the provider appends /ROOM)
//   → prints {"converged":…,"page":{…},"node":{…}} on stdout; exit 1 unless converged
//     within TIMEOUT_MS.
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";
import { chromium } from "playwright-core";

const [pageUrl, serverUrl, room, timeoutMs] = process.argv.slice(2);
const deadline = Date.now() + Number(timeoutMs);

// The Node.js client, connecting while the browser starts.
const doc = new Y.Doc();
const text = doc.getText("text");
const map = doc.getMap("map");
const provider = new WebsocketProvider(serverUrl, room, doc, { WebSocketPolyfill: WebSocket });
const node = { statuses: [], closes: [], connectionErrors: 0, edited: false };
provider.on("status", ({ status }) => node.statuses.push(status));
provider.on("connection-close", (event) => node.closes.push({ code: event?.code ?? null, reason: String(event?.reason ?? "") }));
provider.on("connection-error", () => { node.connectionErrors += 1; });
provider.on("sync", (synced) => {
  if (!synced || node.edited) return;
  node.edited = true;
  text.insert(0, "node;");
  map.set("node", "edited in Node.js");
});
const readNode = () => ({
  url: provider.url, synced: provider.synced, edited: node.edited,
  text: text.toString(), map: map.toJSON(),
  statuses: node.statuses, closes: node.closes, connectionErrors: node.connectionErrors,
  clientID: doc.clientID,
});

// Both edits, each once, and nothing else.
const sawBoth = (s) => typeof s?.text === "string" && s.map != null
  && s.text.length === "browser;node;".length && s.text.includes("browser;") && s.text.includes("node;")
  && s.map.browser === "edited in Chromium" && s.map.node === "edited in Node.js"
  && Object.keys(s.map).length === 2;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

const pageErrors = []; // uncaught errors Playwright reports, and failed requests
const sockets = [];    // the page's WebSockets as DevTools saw them: {url, status, failure}
let pageState = null;
let error = null;
let code = 1;
try {
  const page = await browser.newPage();
  page.on("console", (msg) => console.error(`page: ${msg.text()}`));
  page.on("pageerror", (e) => {
    pageErrors.push(e.message);
    console.error(`page error: ${e.message}`);
  });
  page.on("requestfailed", (r) => pageErrors.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) pageErrors.push(`${r.url()}: ${r.status()}`);
  });
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("Network.enable");
  const socket = (requestId) => sockets.find((s) => s.requestId === requestId) ?? {};
  cdp.on("Network.webSocketCreated", (e) => sockets.push({ requestId: e.requestId, url: e.url, status: null, failure: null }));
  cdp.on("Network.webSocketHandshakeResponseReceived", (e) => { socket(e.requestId).status = e.response.status; });
  cdp.on("Network.webSocketFrameError", (e) => {
    socket(e.requestId).failure = e.errorMessage;
    console.error(`page: WebSocket failure: ${e.errorMessage}`);
  });
  await page.goto(pageUrl, { timeout: Math.max(1, deadline - Date.now()) });

  const readPage = () => page.evaluate(() => ({
    errors: window.errors,
    ...(window.read ? window.read() : { loaded: false }),
  }));
  for (;;) {
    pageState = await readPage();
    const nodeState = readNode();
    if (sawBoth(pageState) && sawBoth(nodeState) && pageState.text === nodeState.text) {
      code = 0;
      break;
    }
    // A page that failed (a module that did not load, say) will not get there.
    if (pageState.errors.length > 0 || pageErrors.length > 0) {
      error = "the page failed";
      break;
    }
    if (Date.now() > deadline) {
      error = `timed out after ${timeoutMs} ms`;
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
} catch (e) {
  error = String(e?.message ?? e);
} finally {
  if (error) console.error(error);
  console.log(JSON.stringify({
    converged: code === 0,
    error,
    page: { ...pageState, pageErrors, sockets: sockets.map(({ requestId, ...s }) => s) },
    node: readNode(),
  }));
  provider.destroy();
  await browser.close();
}
process.exit(code);
