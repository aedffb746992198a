// Shared pieces of the browser tests and benchmark: the page server (`xtask serve`), Debian's
// Chromium driven by playwright-core, the native CLI, and small file formats.

import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const XTASK = path.join(ROOT, "target/release/xtask");
export const CLI = path.join(ROOT, "target/release/instaflow");
export const MODEL = path.join(ROOT, "models/instaflow-shapes");
/** Screenshots and other outputs worth keeping from a test run. */
export const ARTIFACTS = path.join(ROOT, "target/browser-tests");
fs.mkdirSync(ARTIFACTS, { recursive: true });

/** Start `xtask serve --no-build` with `mounts` (default: the page's own) and extra `flags`;
 * resolves to its URL. */
export async function serve(mounts = [], flags = []) {
  const args = ["serve", "--no-build", "--port", "0", ...flags, ...mounts.flatMap((m) => ["--mount", m])];
  const child = spawn(XTASK, args, { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/serving (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    child.on("exit", (code) => reject(new Error(`xtask serve exited (${code}) before serving`)));
  });
  return { url, close: () => child.kill() };
}

/** Headless Chromium; `webgpu: false` leaves WebGPU without an adapter (as on machines without one). */
export async function browser({ webgpu = true } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "instaflow-chromium-"));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync",
      // SwiftShader (software Vulkan) is a block-listed adapter unless this is given.
      ...(webgpu ? ["--enable-unsafe-webgpu"] : []),
    ],
  });
  return {
    context,
    async page() {
      const page = await context.newPage();
      page.on("console", (m) => m.type() === "error" && !/404/.test(m.text()) && console.error("[page]", m.text()));
      page.on("pageerror", (e) => console.error("[page error]", e.message));
      return page;
    },
    close: () => context.close(),
  };
}

/** Run the native CLI; returns stdout. */
export function cli(...args) {
  return execFileSync(CLI, args, { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Write one f32 tensor `name` as safetensors. */
export function writeSafetensors(file, name, shape, values) {
  const header = JSON.stringify({ [name]: { dtype: "F32", shape, data_offsets: [0, values.length * 4] } });
  const pad = (8 - (header.length % 8)) % 8;
  const head = Buffer.from(header + " ".repeat(pad));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(head.length));
  fs.writeFileSync(file, Buffer.concat([len, head, Buffer.from(new Float32Array(values).buffer)]));
}

/** Read the one f32 tensor of a safetensors file. */
export function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString());
  const [name, meta] = Object.entries(header).find(([k]) => k !== "__metadata__");
  const [a, b] = meta.data_offsets;
  const data = buf.subarray(8 + n + a, 8 + n + b);
  return { name, shape: meta.shape, values: new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length)) };
}

/** Standard normal values from a fixed seed (Box–Muller over a 32-bit LCG): test noise. */
export function gaussian(n, seed = 1) {
  let s = seed >>> 0;
  const uniform = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) + 0.5) / 2 ** 32;
  return Array.from({ length: n }, () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform()));
}

/** Decode a PNG in `page` into RGBA bytes (the browser's decoder; no Node PNG dependency). */
export async function decodePng(page, file) {
  const b64 = fs.readFileSync(file).toString("base64");
  return page.evaluate(async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    return { width: bitmap.width, height: bitmap.height, rgba: Array.from(ctx.getImageData(0, 0, bitmap.width, bitmap.height).data) };
  }, b64);
}

/** Largest absolute difference between two equally long arrays. */
export function maxDiff(a, b) {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Wait until the page shows an image or an error; returns its state. */
export async function waitForOutcome(page, timeout = 60_000) {
  await page.waitForFunction(() => window.instaflowPage?.error || window.instaflowPage?.last, null, { timeout });
  return page.evaluate(() => window.instaflowPage);
}

/** Wait for the page to show an image for `prompt` (or an error). */
export async function waitForImage(page, prompt, timeout = 180_000) {
  await page.waitForFunction(
    (p) => {
      const s = window.instaflowPage;
      return s && (s.error || (s.last && s.last.prompt === p && s.state === "ready"));
    },
    prompt,
    { timeout },
  );
  return page.evaluate(() => window.instaflowPage);
}
