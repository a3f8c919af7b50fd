// Opens two copies of wss.html in Debian's headless Chromium: one served from an origin
// the nodes allow, which must receive N updates over wss://, and one from an origin they
// do not, whose WebSocket must end without a welcome. Each page's state is printed
// also when it did not get there, for the test to say what went wrong.
// usage: node wss.mjs TLS_DIR N TIMEOUT_MS ALLOWED_PAGE_URL REFUSED_PAGE_URL
//   → prints {"allowed":{…},"refused":{…}} on stdout; exit 1 if either page did not get
//     there within TIMEOUT_MS.
import { createHash, X509Certificate } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [tlsDir, want, timeoutMs, allowedUrl, refusedUrl] = process.argv.slice(2);

// The cluster's CA (made by `ringfeed-node certs` for this test) is in no trust store
// Chromium reads. Rather than ignoring every certificate error (ignoreHTTPSErrors), trust
// exactly the nodes' keys: Chromium accepts a chain that does not verify when a
// certificate the server presents has a public key whose SHA-256 (of the
// SubjectPublicKeyInfo) is on this list. A node presents its own certificate only, not
// the CA's, so the list holds every node certificate's key (node-*.pem), not the CA's.
const spki = (file) => {
  const der = new X509Certificate(readFileSync(file)).publicKey.export({ type: "spki", format: "der" });
  return createHash("sha256").update(der).digest("base64");
};
const trusted = readdirSync(tlsDir)
  .filter((f) => /^node-.*\.pem$/.test(f))
  .map((f) => spki(join(tlsDir, f)));
if (trusted.length === 0) throw new Error(`no node-*.pem in ${tlsDir}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    `--ignore-certificate-errors-spki-list=${trusted.join(",")}`,
  ],
});

// Chromium's messages name the URL of a failed WebSocket, ticket and all: not in logs.
const log = (text) => console.error(text.replace(/([?&])ticket=[^&'"\s]*/g, "$1ticket=…"));

/// Opens `url` in a page of its own, recording from the DevTools protocol what a page's
/// script never sees: the HTTP status of every WebSocket handshake answered with 101,
/// and the message of every WebSocket failure (a refused upgrade's status is only there:
/// "Error during WebSocket handshake: Unexpected response code: 403").
async function open(name, url) {
  const page = await browser.newPage();
  page.on("console", (msg) => log(`${name}: ${msg.text()}`));
  page.on("pageerror", (e) => log(`${name}: page error: ${e.message}`));
  const handshakes = [];
  const failures = [];
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("Network.enable");
  cdp.on("Network.webSocketHandshakeResponseReceived", (e) => handshakes.push(e.response.status));
  cdp.on("Network.webSocketFrameError", (e) => {
    failures.push(e.errorMessage);
    log(`${name}: WebSocket failure: ${e.errorMessage}`);
  });
  await page.goto(url);
  return { page, handshakes, failures };
}

const state = async ({ page, handshakes, failures }) => ({
  ...(await page.evaluate(() => ({
    ticket: window.ticket, urls: window.urls, welcomes: window.welcomes,
    redirects: window.redirects, seqs: window.seqs, ns: window.ns,
    errors: window.errors, closes: window.closes, done: window.done,
  }))),
  handshakes,
  failures,
});

let code = 0;
try {
  const allowed = await open("allowed", allowedUrl);
  const refused = await open("refused", refusedUrl);
  const wait = async (name, { page }, predicate, arg) => {
    try {
      await page.waitForFunction(predicate, arg, { timeout: Number(timeoutMs), polling: 50 });
    } catch (e) {
      log(`${name} timed out: ${e.message}`);
      code = 1;
    }
  };
  await Promise.all([
    // Every update, and every socket left for a redirect closed; or nothing more to come.
    wait("allowed", allowed, (n) => (window.seqs.length >= n
      && window.closes.length >= window.redirects.length) || window.done, Number(want)),
    // The socket ended; or it was let in, which the test reports.
    wait("refused", refused, () => window.done || window.welcomes.length > 0),
  ]);
  // DevTools events travel apart from the page's: let each socket the page opened be
  // seen there too, answered (101) or failed, before reporting (bounded).
  const settle = async (name, tab) => {
    const until = Date.now() + 5000;
    for (;;) {
      const opened = await tab.page.evaluate(() => window.urls.length);
      if (tab.handshakes.length + tab.failures.length >= opened) return;
      if (Date.now() > until) {
        log(`${name}: DevTools saw ${tab.handshakes.length} handshakes and ${tab.failures.length} failures of ${opened} sockets`);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  await Promise.all([settle("allowed", allowed), settle("refused", refused)]);
  console.log(JSON.stringify({ allowed: await state(allowed), refused: await state(refused) }));
} finally {
  await browser.close();
}
process.exit(code);
