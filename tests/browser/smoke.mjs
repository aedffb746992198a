// Drives Debian's Chromium (headless, WebGPU on SwiftShader) through smoke.html and prints the result.
// Usage: node smoke.mjs URL OUT.json
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [url, out] = process.argv.slice(2);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "instaflow-chromium-"));
const ctx = await chromium.launchPersistentContext(dir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu"],
});
const page = await ctx.newPage();
page.on("console", (m) => console.error("[page]", m.text()));
await page.goto(url);
await page.waitForFunction(() => window.__result, null, { timeout: 600_000 });
const result = await page.evaluate(() => window.__result);
await page.screenshot({ path: out.replace(/\.json$/, ".png") });
fs.writeFileSync(out, JSON.stringify(result));
console.log(JSON.stringify({ ...result, rgba: `${result.rgba?.length ?? 0} bytes` }));
await ctx.close();
