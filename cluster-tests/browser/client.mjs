// Opens the browser client's page in headless Chromium, waits until the update with
// n = LAST has arrived, then (with "publish") publishes from the page.
// usage: node client.mjs PAGE_URL LAST TIMEOUT_MS [publish]  → JSON on stdout
// With TLS_DIR (a secure cluster's certificates) the nodes' keys are trusted, as wss.mjs
// explains; the page records presence events and reconnects with resume tokens then.
import { createHash, X509Certificate } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, last, timeoutMs, publish] = process.argv.slice(2);
const trust = [];
if (process.env.TLS_DIR) {
  const dir = process.env.TLS_DIR;
  const spki = (file) => {
    const der = new X509Certificate(readFileSync(file)).publicKey.export({ type: "spki", format: "der" });
    return createHash("sha256").update(der).digest("base64");
  };
  const keys = readdirSync(dir).filter((f) => /^node-.*\.pem$/.test(f)).map((f) => spki(join(dir, f)));
  trust.push(`--ignore-certificate-errors-spki-list=${keys.join(",")}`);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ...trust,
  ],
});
let code = 0;
try {
  const page = await browser.newPage();
  // Chromium's messages name a failed WebSocket's URL, ticket and all: not in logs.
  const quiet = (text) => text.replace(/([?&](ticket|resume)=)[^&'"\s]*/g, "$1…");
  page.on("console", (msg) => console.error(`page: ${quiet(msg.text())}`));
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(pageUrl);
  try {
    await page.waitForFunction((n) => window.ns && window.ns.includes(n), Number(last), {
      timeout: Number(timeoutMs),
      polling: 50,
    });
  } catch (e) {
    console.error(`timed out: ${e.message}`);
    code = 1;
  }
  let published = null;
  if (publish === "publish" && code === 0) {
    published = await page.evaluate(async () => {
      try {
        return (await window.sub.publish({ n: -1, from: "page" })).seq;
      } catch (e) {
        return String(e);
      }
    });
  }
  const state = await page.evaluate(() => ({
    seqs: window.seqs, ns: window.ns, resets: window.resets, errors: window.errors,
    presence: window.presence,
    transports: [...new Set(window.states.filter((s) => s.state === "open").map((s) => s.transport))],
    nodes: window.states.filter((s) => s.state === "open").map((s) => s.node),
  }));
  console.log(JSON.stringify({ ...state, published }));
} finally {
  await browser.close();
}
process.exit(code);
