// An SD-1.5-size model (random weights, the diffusers layout InstaFlow-0.9B is published in) loaded
// by the npm package over HTTP Range on WebGPU in headless Chromium (SwiftShader), one step at a
// small size, against the native CLI on the same folder and noise. Prints load time, bytes, wasm
// memory and JS heap, and the latents' difference. Run by scripts/browser-sd15.sh.
//   node tests/browser/sd15.mjs [--dtype f16|f32] [--size 64]

import fs from "node:fs";
import path from "node:path";
import { ROOT, browser, cli, gaussian, maxDiff, readSafetensors, serve, writeSafetensors } from "./harness.mjs";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const dtype = arg("dtype", "f16");
const size = Number(arg("size", "64"));
const dir = path.join(ROOT, `target/sd15-random-${dtype}`);
const work = path.join(ROOT, "target/browser-tests/sd15");
fs.mkdirSync(work, { recursive: true });

const seconds = (t) => ((performance.now() - t) / 1000).toFixed(1);
if (!fs.existsSync(path.join(dir, "unet/diffusion_pytorch_model.safetensors"))) {
  const t = performance.now();
  fs.rmSync(dir, { recursive: true, force: true });
  cli("random-model", "--preset", "sd15", "--dtype", dtype, "--seed", "0", "--out", dir);
  console.log(`made ${dir} in ${seconds(t)} s`);
}
const weightBytes = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
  .reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);

const latent = size / 8;
const noise = gaussian(4 * latent * latent, 11);
writeSafetensors(path.join(work, "noise.safetensors"), "noise", [1, 4, latent, latent], noise);
let t = performance.now();
cli("--backend", "cpu", "generate", "a photograph of an astronaut riding a horse", "--model", dir, "--noise", path.join(work, "noise.safetensors"),
  "--save-latents", path.join(work, "latents.safetensors"), "--out", path.join(work, "native.png"));
const nativeSeconds = seconds(t);
const native = readSafetensors(path.join(work, "latents.safetensors")).values;

const server = await serve([`/=${path.join(ROOT, "tests/browser/blank")}`, `/instaflow=${path.join(ROOT, "web")}`, `/sd15=${dir}`]);
const b = await browser({ webgpu: true });
try {
  const page = await b.page();
  await page.goto(server.url);
  await page.waitForFunction(() => window.instaflow);
  const before = (await (await fetch(`${server.url}__stats`)).json()).bytes;
  const result = await page.evaluate(
    async ({ noise, size }) => {
      const { InstaFlow, wasmMemoryBytes } = window.instaflow;
      let peakHeap = 0;
      const sample = () => (peakHeap = Math.max(peakHeap, performance.memory?.usedJSHeapSize ?? 0));
      const timer = setInterval(sample, 200);
      try {
        let t = performance.now();
        const model = await InstaFlow.load("/sd15/", { backend: "webgpu", cache: false, onProgress: sample });
        const loadMs = performance.now() - t;
        const afterLoad = wasmMemoryBytes();
        t = performance.now();
        const image = await model.generate({ prompt: "a photograph of an astronaut riding a horse", noise: new Float32Array(noise), latents: true, width: size, height: size });
        const generateMs = performance.now() - t;
        model.free();
        return { loadMs, generateMs, afterLoad, afterGenerate: image.wasmMemoryBytes, stats: model.loadStats, timings: image.timings, latents: Array.from(image.latents), peakHeap };
      } catch (e) {
        return { error: String(e.message ?? e) };
      } finally {
        clearInterval(timer);
      }
    },
    { noise, size },
  );
  if (result.error) throw new Error(result.error);
  const served = (await (await fetch(`${server.url}__stats`)).json()).bytes - before;
  const diff = maxDiff(result.latents, native);
  const scale = native.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const mib = (n) => `${(n / 2 ** 20).toFixed(0)} MiB`;
  console.log(`SD-1.5-size folder (${dtype}, random weights): ${(weightBytes / 1e9).toFixed(2)} GB of weights, ${(result.stats.deviceBytes / 1e9).toFixed(2)} GB on the device (f32)`);
  console.log(`load: ${(result.loadMs / 1000).toFixed(1)} s, ${(served / 1e9).toFixed(2)} GB served, ${result.stats.pieces} pieces in ${result.stats.requests} requests`);
  console.log(`wasm memory: ${mib(result.afterLoad)} after loading, ${mib(result.afterGenerate)} after generating; JS heap peak ${mib(result.peakHeap)}`);
  console.log(`one step at ${size}×${size} on WebGPU (SwiftShader): ${(result.generateMs / 1000).toFixed(1)} s (text ${(result.timings.encodeMs / 1000).toFixed(1)} s, UNet ${(result.timings.unetMs / 1000).toFixed(1)} s, decode ${(result.timings.decodeMs / 1000).toFixed(1)} s); native CLI (CPU, incl. load) ${nativeSeconds} s`);
  console.log(`latents vs native CLI: max |Δ| ${diff.toExponential(2)} (max |latent| ${scale.toFixed(2)})`);
  const ok = result.afterGenerate <= 256 * 2 ** 20 && diff <= 1e-3 * Math.max(1, scale);
  console.log(ok ? "PASS: wasm memory ≤ 256 MiB and latents within 1e-3 (relative to their scale)" : "FAIL");
  process.exitCode = ok ? 0 : 1;
} finally {
  await b.close();
  server.close();
}
