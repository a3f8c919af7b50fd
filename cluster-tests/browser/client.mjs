// Opens the browser client's page in headless Chromium, waits until the update with
// n = LAST has arrived, then (with "publish") publishes from the page.
// usage: node client.mjs PAGE_URL LAST TIMEOUT_MS [publish]  → JSON on stdout
import { chromium } from "playwright-core";

const [pageUrl, last, timeoutMs, publish] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let code = 0;
try {
  const page = await browser.newPage();
  page.on("console", (msg) => console.error(`page: ${msg.text()}`));
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
    transports: [...new Set(window.states.filter((s) => s.state === "open").map((s) => s.transport))],
    nodes: window.states.filter((s) => s.state === "open").map((s) => s.node),
  }));
  console.log(JSON.stringify({ ...state, published }));
} finally {
  await browser.close();
}
process.exit(code);
