// The web page and the package's API in headless Chromium (WebGPU on SwiftShader, and the wasm CPU
// fallback), against the native CLI on the same machine.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import {
  ARTIFACTS, MODEL, browser, cli, decodePng, gaussian, maxDiff, readSafetensors, serve, waitForImage, waitForOutcome,
  writeSafetensors,
} from "./harness.mjs";

let server;
let gpu;
let cpu;

before(async () => {
  server = await serve();
  gpu = await browser({ webgpu: true });
  cpu = await browser({ webgpu: false });
});

after(async () => {
  await gpu?.close();
  await cpu?.close();
  server?.close();
});

/** The WebGPU page, kept open from test to test: a new page sets up a new GPU device, and compiles
 * every shader again (half a minute on a software adapter). */
let gpuPage;
async function webgpuPage() {
  if (!gpuPage) {
    gpuPage = await gpu.page();
    await gpuPage.goto(server.url);
  }
  return gpuPage;
}

/** The native CLI's image for `prompt` (seed 0, 1:1 pixels) as RGBA bytes. */
async function nativeImage(page, prompt) {
  const out = path.join(ARTIFACTS, `native-${prompt.replace(/\W+/g, "_")}.png`);
  cli("--backend", "cpu", "generate", prompt, "--seed", "0", "--scale", "1", "--out", out);
  return decodePng(page, out);
}

/** Spread of the image's colour values: a blank or constant image has none. */
function spread(rgba) {
  const values = rgba.filter((_, i) => i % 4 !== 3);
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  return Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
}

test("the page turns a typed prompt into the native CLI's image (WebGPU)", async () => {
  const page = await webgpuPage();
  const first = await waitForImage(page, "red heart");
  assert.equal(first.error, null, first.error);
  assert.equal(first.backend, "webgpu");
  await page.fill("#prompt", "");
  await page.type("#prompt", "blue circle", { delay: 30 });
  const state = await waitForImage(page, "blue circle");
  assert.equal(state.error, null, state.error);
  assert.equal(state.last.width, 32);
  assert.ok(spread(state.last.rgba) > 10, `image looks blank (spread ${spread(state.last.rgba)})`);
  const native = await nativeImage(page, "blue circle");
  const diff = maxDiff(state.last.rgba, native.rgba);
  // 8-bit rounding of f32 results computed in a different order: at most one level apart.
  assert.ok(diff <= 2, `browser vs native: max pixel difference ${diff}`);
  await page.screenshot({ path: path.join(ARTIFACTS, "page-webgpu.png"), fullPage: true });
  console.log(`webgpu: ${state.last.timings.totalMs.toFixed(0)} ms, max diff to native ${diff}`);
});

test("typing fast runs only the newest request, never a queue of stale ones", async () => {
  const page = await webgpuPage();
  await waitForOutcome(page);
  const before = await page.evaluate(() => ({ requests: window.instaflowPage.requests, generations: window.instaflowPage.generations }));
  const text = "a yellow star on a green field";
  await page.fill("#prompt", "");
  // Slower than the debounce (each key makes a request), faster than one generation.
  await page.type("#prompt", text, { delay: 150 });
  const state = await waitForImage(page, text);
  await page.waitForTimeout(1500);
  const settled = await page.evaluate(() => window.instaflowPage);
  assert.equal(settled.error, null, settled.error);
  assert.equal(settled.last.prompt, text);
  assert.equal(settled.generations, state.generations, "generations went on after the last request");
  const requests = settled.requests - before.requests;
  const generations = settled.generations - before.generations;
  const stale = settled.log.filter((g) => g.request !== g.newest);
  assert.deepEqual(stale, [], "a generation ran a request that was no longer the newest");
  assert.ok(generations < requests, `${generations} generations for ${requests} requests: stale requests were not dropped`);
  console.log(`typing: ${requests} requests → ${generations} generations`);
});

test("broken model files give readable errors, not hangs", async () => {
  const cases = [
    ["**/unet/diffusion_pytorch_model.safetensors", (r) => r.fulfill({ status: 200, body: Buffer.from("this is not a safetensors file at all") }), /unet\/diffusion_pytorch_model\.safetensors/],
    ["**/text_encoder/config.json", (r) => r.fulfill({ status: 404, body: "not found" }), /text_encoder\/config\.json: HTTP 404/],
    ["**/unet/config.json", (r) => r.abort(), /could not reach .*unet\/config\.json/],
  ];
  for (const [pattern, handler, expected] of cases) {
    const page = await cpu.page();
    await page.route(pattern, handler);
    await page.goto(`${server.url}?backend=cpu`);
    const state = await waitForOutcome(page);
    assert.match(state.error ?? "", expected);
    assert.equal(await page.isVisible("#error"), true);
    await page.close();
  }
  // A tensor missing from the UNet file (renamed in the header, so the file stays valid): the
  // loader names it.
  const page = await cpu.page();
  const unet = fs.readFileSync(path.join(MODEL, "unet/diffusion_pytorch_model.safetensors"));
  const n = Number(unet.readBigUInt64LE(0));
  const header = unet.subarray(8, 8 + n).toString().replace('"conv_out.weight"', '"conv_XXX.weight"');
  const head = Buffer.from(header);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(head.length));
  await page.route("**/unet/diffusion_pytorch_model.safetensors", (r) => r.fulfill({ status: 200, body: Buffer.concat([len, head, unet.subarray(8 + n)]) }));
  await page.goto(`${server.url}?backend=cpu`);
  assert.match((await waitForOutcome(page)).error ?? "", /conv_out/);
  await page.close();
});

test("without a WebGPU adapter the page falls back to the CPU and draws the same image", async () => {
  const page = await cpu.page();
  await page.goto(server.url);
  const state = await waitForImage(page, "red heart");
  assert.equal(state.error, null, state.error);
  assert.equal(state.backend, "cpu");
  const native = await nativeImage(page, "red heart");
  const diff = maxDiff(state.last.rgba, native.rgba);
  assert.ok(diff <= 2, `cpu fallback vs native: max pixel difference ${diff}`);
  await page.screenshot({ path: path.join(ARTIFACTS, "page-cpu.png"), fullPage: true });
  // Asking for WebGPU explicitly where there is none is an error that says so.
  const strict = await cpu.page();
  await strict.goto(`${server.url}?backend=webgpu`);
  await strict.waitForFunction(() => window.instaflowPage?.error, null, { timeout: 60_000 });
  assert.match(await strict.evaluate(() => window.instaflowPage.error), /WebGPU is not available/);
  await page.close();
  await strict.close();
});

test("API: the same noise gives the native CLI's latents within 1e-3 on both backends", async () => {
  const shape = [1, 3, 32, 32];
  const noise = gaussian(shape.reduce((a, b) => a * b), 42);
  const noiseFile = path.join(ARTIFACTS, "noise.safetensors");
  const latentsFile = path.join(ARTIFACTS, "native-latents.safetensors");
  writeSafetensors(noiseFile, "noise", shape, noise);
  cli("--backend", "cpu", "generate", "green tree", "--noise", noiseFile, "--save-latents", latentsFile, "--out", path.join(ARTIFACTS, "native-noise.png"));
  const native = readSafetensors(latentsFile);
  assert.deepEqual(native.shape, shape);
  for (const backend of ["webgpu", "cpu"]) {
    let page = await webgpuPage();
    if (backend === "cpu") {
      page = await cpu.page();
      await page.goto(server.url);
    }
    const result = await page.evaluate(
      async ({ noise, backend }) => {
        const { InstaFlow } = await import("/instaflow/index.js");
        const gen = await InstaFlow.load("/models/instaflow-shapes/", { backend });
        const out = await gen.generate({ prompt: "green tree", noise: new Float32Array(noise), latents: true });
        const shape = gen.noiseShape;
        gen.free();
        return { backend: out.backend, shape, latents: Array.from(out.latents), timings: out.timings };
      },
      { noise, backend },
    );
    assert.equal(result.backend, backend);
    assert.deepEqual(result.shape, shape);
    const diff = maxDiff(result.latents, native.values);
    assert.ok(diff < 1e-3, `${backend}: latents differ from native by ${diff}`);
    console.log(`api ${backend}: max latent difference to native ${diff.toExponential(2)}`);
    if (backend === "cpu") await page.close();
  }
});

test("a model folder chosen from disk loads and gives the same image", async () => {
  const page = await cpu.page();
  await page.goto(server.url);
  const builtin = await waitForImage(page, "red heart");
  await page.selectOption("#model", "folder").catch(() => {}); // opens the picker; answered below
  await page.setInputFiles("#folder", MODEL);
  await page.waitForFunction(() => /instaflow-shapes · /.test(document.getElementById("load-status").textContent), null, { timeout: 60_000 });
  const state = await waitForImage(page, "red heart");
  assert.equal(state.error, null, state.error);
  assert.equal(maxDiff(state.last.rgba, builtin.last.rgba), 0);
  await page.close();
});

test("new seed changes the image, and download PNG saves it enlarged", async () => {
  const page = await cpu.page();
  await page.goto(server.url);
  const first = await waitForImage(page, "red heart");
  await page.click("#new-seed");
  await page.waitForFunction((s) => window.instaflowPage.last?.seed !== s && window.instaflowPage.state === "ready", first.last.seed, { timeout: 60_000 });
  const next = await page.evaluate(() => window.instaflowPage.last);
  assert.notEqual(next.seed, first.last.seed);
  assert.equal(String(next.seed), await page.inputValue("#seed"));
  assert.ok(maxDiff(next.rgba, first.last.rgba) > 0, "a new seed gave the same image");
  const save = async (name) => {
    const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
    const file = path.join(ARTIFACTS, name);
    await download.saveAs(file);
    assert.match(download.suggestedFilename(), /^red_heart-\d+\.png$/);
    const png = await decodePng(page, file);
    assert.deepEqual([png.width, png.height], [256, 256]);
    return png;
  };
  // Shown smoothly enlarged by default; unticked, the pixels are shown (and saved) as they are.
  assert.equal(await page.evaluate(() => getComputedStyle(document.getElementById("image")).imageRendering), "auto");
  await page.uncheck("#smooth");
  assert.equal(await page.evaluate(() => getComputedStyle(document.getElementById("image")).imageRendering), "pixelated");
  const sharp = await save("downloaded.png");
  // Nearest-neighbour enlargement: every pixel of the top-left block is the image's first pixel.
  const { width } = next;
  const scale = 256 / width;
  for (const [x, y] of [[0, 0], [scale - 1, scale - 1]]) {
    assert.deepEqual(sharp.rgba.slice(4 * (y * 256 + x), 4 * (y * 256 + x) + 4), next.rgba.slice(0, 4));
  }
  await page.check("#smooth");
  const smooth = await save("downloaded-smooth.png");
  // Interpolated: pixels between block centres differ from nearest ones, but the picture is the same.
  assert.ok(maxDiff(smooth.rgba, sharp.rgba) > 0, "smooth enlargement saved the nearest-neighbour image");
  const mean = (a) => a.reduce((s, v) => s + v, 0) / a.length;
  assert.ok(Math.abs(mean(smooth.rgba) - mean(sharp.rgba)) < 3, "smooth enlargement changed the picture");
  await page.close();
});
