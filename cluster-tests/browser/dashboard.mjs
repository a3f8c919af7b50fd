// Opens the dashboard (GET / on a node) in headless Chromium and follows commands, one
// a line on stdin, answering each with one line on stdout:
//   viewport W H                    → "ok"
//   wait NAME TIMEOUT_MS EXPRESSION → waits until EXPRESSION (JavaScript, in the page) is
//                                     true, then saves NAME.png in ARTIFACTS:
//                                     "ok NAME ELAPSED_MS" or "timeout NAME ELAPSED_MS"
//   eval EXPRESSION                 → "value JSON"
//   quit
// usage: node dashboard.mjs DASHBOARD_URL ARTIFACTS_DIR
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [url, artifacts] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.on("console", (msg) => console.error(`page: ${msg.text()}`));
page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
await page.goto(url);
console.log("loaded");

// Polls EXPRESSION from here (DevTools evaluation, which the page's Content Security
// Policy does not forbid; waitForFunction would eval inside the page, which it does).
async function until(expression, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await page.evaluate(expression)) return;
    if (Date.now() > deadline) throw new Error(`not true within ${timeout} ms: ${expression}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const [command, ...rest] = line.split(" ");
  if (command === "quit") break;
  if (command === "viewport") {
    await page.setViewportSize({ width: Number(rest[0]), height: Number(rest[1]) });
    console.log("ok");
  } else if (command === "wait") {
    const [name, timeout, ...expression] = rest;
    const started = Date.now();
    try {
      await until(expression.join(" "), Number(timeout));
      const elapsed = Date.now() - started;
      await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
      console.log(`ok ${name} ${elapsed}`);
    } catch (e) {
      console.error(`${name}: ${e.message}`);
      await page.screenshot({ path: join(artifacts, `${name}-timeout.png`), fullPage: true });
      console.log(`timeout ${name} ${Date.now() - started}`);
    }
  } else if (command === "eval") {
    const value = await page.evaluate(rest.join(" "));
    console.log(`value ${JSON.stringify(value)}`);
  } else {
    console.log(`unknown ${command}`);
  }
}
await browser.close();
