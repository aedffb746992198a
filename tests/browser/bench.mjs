// One-step latency of the built-in model in headless Chromium (WebGPU on SwiftShader, and the wasm
// CPU fallback) against the native CLI on the same machine, and the size of the wasm bundle.
// Prints a Markdown table. Run by scripts/bench-browser.sh (which builds what it needs).

import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { ROOT, browser, cli, serve } from "./harness.mjs";

const RUNS = Number(process.env.RUNS ?? 30);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function inBrowser(server, webgpu, backend) {
  const b = await browser({ webgpu });
  try {
    const page = await b.page();
    await page.goto(`${server.url}?backend=cpu`); // the page's own model is not used here
    return await page.evaluate(
      async ({ backend, runs }) => {
        const { InstaFlow } = await import("/instaflow/index.js");
        const t0 = performance.now();
        const gen = await InstaFlow.load("/models/instaflow-shapes/", { backend });
        const loadMs = performance.now() - t0;
        const first = (await gen.generate({ prompt: "red heart", seed: 0 })).timings.totalMs;
        const warm = [];
        for (let i = 0; i < runs; i++) warm.push((await gen.generate({ prompt: `red heart ${i}`, seed: i })).timings);
        gen.free();
        return { loadMs, first, warm };
      },
      { backend, runs: RUNS },
    );
  } finally {
    await b.close();
  }
}

/** The native CLI on the same prompt: the first image, then RUNS more with the model loaded. */
function native(backend) {
  const out = path.join(ROOT, "target/browser-tests/bench-native.png");
  const j = JSON.parse(cli("--backend", backend, "generate", "red heart", "--seed", "0", "--json", "--repeats", String(RUNS), "--out", out));
  const t = j.timings_ms;
  return { warm: t.warm, first: t.text_encode + t.unet_steps.reduce((a, b) => a + b, 0) + t.decode, load: t.load };
}

const server = await serve();
try {
  const gpu = await inBrowser(server, true, "webgpu");
  const cpu = await inBrowser(server, false, "cpu");
  const nat = native("cpu");
  const row = (name, r) =>
    `| ${name} | ${median(r.warm.map((t) => t.totalMs)).toFixed(1)} | ${median(r.warm.map((t) => t.unetMs)).toFixed(1)} | ${r.first.toFixed(0)} | ${r.loadMs.toFixed(0)} |`;
  console.log(`\nOne-step latency, built-in model (32×32, prompt → RGBA), median of ${RUNS} warm runs, ms:\n`);
  console.log("| where | per image | UNet | first image | load |");
  console.log("|---|---:|---:|---:|---:|");
  console.log(row("Chromium, WebGPU (SwiftShader, software)", gpu));
  console.log(row("Chromium, wasm CPU fallback (SIMD128)", cpu));
  console.log(
    `| native CLI, \`--backend cpu\` (\`generate --repeats ${RUNS}\`) | ${nat.warm.total.toFixed(1)} | ${nat.warm.unet.toFixed(1)} | ${nat.first.toFixed(0)} | ${nat.load.toFixed(0)} |`,
  );
  const wasmCpu = median(cpu.warm.map((t) => t.totalMs));
  console.log(`\nwasm CPU ÷ native CPU: ${(wasmCpu / nat.warm.total).toFixed(2)}×`);

  console.log("\nBundle (web/pkg, as served):\n");
  console.log("| file | raw | gzip -9 |");
  console.log("|---|---:|---:|");
  for (const f of ["instaflow_wasm_bg.wasm", "instaflow_wasm.js"]) {
    const bytes = fs.readFileSync(path.join(ROOT, "web/pkg", f));
    const gz = zlib.gzipSync(bytes, { level: 9 }).length;
    console.log(`| ${f} | ${(bytes.length / 1e6).toFixed(2)} MB | ${(gz / 1e6).toFixed(2)} MB |`);
  }
} finally {
  server.close();
}
