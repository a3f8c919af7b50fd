// Opens a page in Debian's headless Chromium and waits until it has received N updates.
// usage: node sse.mjs PAGE_URL N TIMEOUT_MS   → prints {"seqs":[…],"opens":…,…} on stdout
import { chromium } from "playwright-core";

const [pageUrl, want, timeoutMs] = process.argv.slice(2);
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
  await page.goto(pageUrl);
  try {
    await page.waitForFunction((n) => window.seqs.length >= n, Number(want), {
      timeout: Number(timeoutMs),
      polling: 50,
    });
  } catch (e) {
    console.error(`timed out: ${e.message}`);
    code = 1;
  }
  const state = await page.evaluate(() => ({
    seqs: window.seqs, opens: window.opens, errors: window.errors, resets: window.resets,
  }));
  console.log(JSON.stringify(state));
} finally {
  await browser.close();
}
process.exit(code);
