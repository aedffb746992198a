// The package's streaming loader in headless Chromium: weights read by HTTP Range in small pieces
// (an SD-1.5-architecture model with a VAE, narrow layers), the Cache API, switching models,
// Hugging Face ids, servers that ignore Range or compress, and the CPU backend's refusal of an
// SD-1.5-size model before any weight byte is fetched. Cancelling, crashes and lost devices:
// workers.test.mjs.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ROOT, browser, cli, gaussian, maxDiff, readSafetensors, serve, writeSafetensors } from "./harness.mjs";

const work = fs.mkdtempSync(path.join(os.tmpdir(), "instaflow-stream-"));
const MINI = path.join(work, "mini");
const SD15 = path.join(work, "sd15-zeros");
/** The same model as MINI with its tokenizer as one `tokenizer.json`. */
const MINI_JSON = path.join(work, "mini-json");
const PAGE = path.join(ROOT, "tests/browser/blank");
const PROMPT = "a red heart";
/** Small pieces and requests, so that tensors are split and a load makes many requests. */
const SMALL = { pieceBytes: 16384, requestBytes: 65536 };

let server;
let noise;
let native;
let gpu;

const stats = async () => (await fetch(`${server.url}__stats`)).json();

before(async () => {
  cli("random-model", "--preset", "mini", "--dtype", "f16", "--seed", "1", "--out", MINI);
  cli("random-model", "--preset", "mini", "--dtype", "f16", "--seed", "1", "--tokenizer-json", "--out", MINI_JSON);
  cli("random-model", "--preset", "sd15", "--zeros", "--out", SD15);
  noise = gaussian(4 * 8 * 8, 5);
  writeSafetensors(path.join(work, "noise.safetensors"), "noise", [1, 4, 8, 8], noise);
  cli(
    "--backend", "cpu", "generate", PROMPT, "--model", MINI, "--noise", path.join(work, "noise.safetensors"),
    "--save-latents", path.join(work, "latents.safetensors"), "--out", path.join(work, "native.png"),
  );
  native = readSafetensors(path.join(work, "latents.safetensors")).values;
  server = await serve([`/=${PAGE}`, `/instaflow=${path.join(ROOT, "web")}`, `/mini=${MINI}`, `/mini-json=${MINI_JSON}`, `/sd15=${SD15}`, `/org/mini/resolve/main=${MINI}`, `/models=${path.join(ROOT, "models")}`, `/work=${work}`]);
  gpu = await browser({ webgpu: true });
});

after(async () => {
  await gpu?.close();
  server?.close();
  fs.rmSync(work, { recursive: true, force: true });
});

/** A blank page with the package imported and its wasm module instantiated (so that byte counts
 * that follow are the model's alone). */
async function openPage(b = gpu, url = server.url) {
  const page = await b.page();
  await page.goto(url);
  await page.waitForFunction(() => window.instaflow);
  await page.evaluate(() => window.instaflow.init());
  return page;
}

let shared;
/** One page for the tests that load and generate in turn: its GPU device, and the shaders compiled
 * for it, carry over from test to test (a new device compiles every shader again). */
async function sharedPage() {
  shared ??= await openPage();
  return shared;
}

/** In the page: load `source` with `options`, generate with the test noise, free; returns what
 * happened (latents, stats, wasm memory) or the error. */
function loadAndGenerate(page, source, options) {
  return page.evaluate(
    async ({ source, options, noise, prompt }) => {
      try {
        const model = await window.instaflow.InstaFlow.load(source, options);
        const image = await model.generate({ prompt, noise: new Float32Array(noise), latents: true });
        model.free();
        return { latents: Array.from(image.latents), stats: model.loadStats, backend: image.backend, precision: image.precision, wasm: image.wasmMemoryBytes, size: [image.width, image.height] };
      } catch (e) {
        return { error: String(e.message ?? e), name: e.name };
      }
    },
    { source, options, noise, prompt: PROMPT },
  );
}

test("a model with a VAE streams over HTTP ranges in small pieces; latents equal the native CLI's", async () => {
  const page = await sharedPage();
  for (const backend of ["webgpu", "cpu"]) {
    const r = await loadAndGenerate(page, "/mini/", { backend, cache: false, ...SMALL });
    assert.equal(r.error, undefined, r.error);
    assert.equal(r.backend, backend);
    // SwiftShader has no `shader-f16`: "auto" computes in f32 there.
    assert.equal(r.precision, "f32");
    assert.deepEqual(r.size, [64, 64]);
    const diff = maxDiff(r.latents, native);
    assert.ok(diff <= 1e-3, `${backend}: latents differ from the CLI's by ${diff}`);
    // Tensors larger than a piece were split: more pieces than tensors, many requests.
    assert.ok(r.stats.pieces > 300 && r.stats.requests > 50, JSON.stringify(r.stats));
    console.log(`${backend}: max |Δlatents| ${diff.toExponential(2)}, ${r.stats.pieces} pieces in ${r.stats.requests} requests, wasm memory ${(r.wasm / 2 ** 20).toFixed(0)} MiB`);
  }
});

test("a model trained from an SD-architecture folder (latent 2-RF, CLIP and VAE frozen) streams and gives the CLI's latents", async () => {
  const prompts = path.join(work, "prompts.txt");
  fs.writeFileSync(prompts, `${PROMPT}\na blue car\n`);
  const pairs = path.join(work, "pairs");
  const run = path.join(work, "2rf");
  cli("--backend", "cpu", "reflow", "--model", MINI, "--prompts", prompts, "--pairs", "2", "--solver", "euler:2", "--out", pairs);
  cli("--backend", "cpu", "train", "--pairs", pairs, "--init", MINI, "--steps", "2", "--batch", "1", "--warmup", "1", "--lr", "1e-3", "--out", run);
  const model = path.join(run, "model");
  for (const frozen of ["text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]) {
    assert.deepEqual(fs.readFileSync(path.join(model, frozen)), fs.readFileSync(path.join(MINI, frozen)), `${frozen} changed`);
  }
  const latents = path.join(work, "2rf-latents.safetensors");
  cli(
    "--backend", "cpu", "generate", PROMPT, "--model", model, "--noise", path.join(work, "noise.safetensors"),
    "--save-latents", latents, "--out", path.join(work, "2rf.png"),
  );
  const trained = readSafetensors(latents).values;
  const moved = maxDiff(trained, native);
  assert.ok(moved > 1e-3, `training changed the latents by only ${moved}`);
  const page = await sharedPage();
  for (const backend of ["webgpu", "cpu"]) {
    const r = await loadAndGenerate(page, "/work/2rf/model/", { backend, cache: false });
    assert.equal(r.error, undefined, r.error);
    const diff = maxDiff(r.latents, trained);
    assert.ok(diff <= 1e-3, `${backend}: latents differ from the CLI's by ${diff}`);
    console.log(`trained model, ${backend}: max |Δlatents| ${diff.toExponential(2)} (training moved them by ${moved.toExponential(2)})`);
  }
});

test("a tokenizer given as tokenizer.json only gives the same latents; a size no WebGPU buffer can hold is refused before allocating", async () => {
  assert.ok(!fs.existsSync(path.join(MINI_JSON, "tokenizer/vocab.json")));
  const page = await sharedPage();
  for (const backend of ["webgpu", "cpu"]) {
    const r = await loadAndGenerate(page, "/mini-json/", { backend, cache: false });
    assert.equal(r.error, undefined, r.error);
    const diff = maxDiff(r.latents, native);
    assert.ok(diff <= 1e-3, `${backend}: latents differ from the CLI's by ${diff}`);
  }
  // The VAE decoder's full-resolution layer of a 4096² image is one tensor of gigabytes: refused
  // with the device's buffer limit named, and the model stays usable.
  const big = await page.evaluate(async (prompt) => {
    const model = await window.instaflow.InstaFlow.load("/mini/", { backend: "webgpu", cache: false });
    const error = await model.generate({ prompt, width: 4096, height: 4096 }).then(() => "generated", (e) => e.message);
    const after = await model.generate({ prompt }).then((img) => `${img.width}×${img.height}`, (e) => e.message);
    model.free();
    return { error, after };
  }, PROMPT);
  assert.match(big.error, /a 4096×4096 image needs a GPU buffer of at least \d+ MB \(the VAE decoder's full-resolution layers\); this WebGPU device allows \d+ MB per buffer/);
  assert.equal(big.after, "64×64");
  console.log(`WebGPU: ${big.error}`);
});

test("the second load reads nothing from the network; a changed file is fetched again; an abort leaves no half entry", async () => {
  const page = await sharedPage();
  await page.evaluate(() => window.instaflow.clearCache());
  const served = async (run) => {
    const before = (await stats()).bytes;
    const r = await run();
    return { r, bytes: (await stats()).bytes - before };
  };
  const first = await served(() => loadAndGenerate(page, "/mini/", SMALL));
  assert.equal(first.r.error, undefined, first.r.error);
  assert.ok(first.bytes >= first.r.stats.weightBytes, `first load served ${first.bytes} bytes`);
  const second = await served(() => loadAndGenerate(page, "/mini/", SMALL));
  assert.equal(second.r.error, undefined, second.r.error);
  assert.equal(second.bytes, 0, "the second load fetched bytes");
  assert.deepEqual(second.r.latents, first.r.latents);

  // A new version of one file (new modification time → new ETag): only it is fetched again.
  const unet = path.join(MINI, "unet/diffusion_pytorch_model.safetensors");
  const later = new Date(Date.now() + 60_000);
  fs.utimesSync(unet, later, later);
  const third = await served(() => loadAndGenerate(page, "/mini/", SMALL));
  assert.equal(third.r.error, undefined, third.r.error);
  const unetBytes = fs.statSync(unet).size;
  assert.ok(third.bytes > 0.9 * unetBytes && third.bytes <= unetBytes, `changed file: ${third.bytes} bytes served, unet is ${unetBytes}`);

  // Cancelled half-way: an AbortError, and every cache entry holds all of its bytes.
  await page.evaluate(() => window.instaflow.clearCache());
  const aborted = await page.evaluate(async (SMALL) => {
    const controller = new AbortController();
    try {
      await window.instaflow.InstaFlow.load("/mini/", {
        ...SMALL,
        signal: controller.signal,
        onProgress: ({ loaded, total }) => loaded > total / 3 && controller.abort(),
      });
      return { error: null };
    } catch (e) {
      const cache = await caches.open("instaflow-models-v1");
      const entries = [];
      for (const request of await cache.keys()) {
        const range = new URL(request.url).searchParams.get("instaflow-bytes");
        const body = await (await cache.match(request)).arrayBuffer();
        entries.push({ range, length: body.byteLength });
      }
      return { error: e.message, name: e.name, entries };
    }
  }, SMALL);
  assert.equal(aborted.name, "AbortError", aborted.error);
  const ranged = aborted.entries.filter((e) => e.range);
  assert.ok(ranged.length > 0, "some pieces were cached before the abort");
  for (const { range, length } of ranged) {
    const [a, b] = range.split("-").map(Number);
    assert.equal(length, b - a, `cache entry ${range} holds ${length} bytes`);
  }
  // After the abort, a load completes (partly from the cache) with the same result.
  const after = await loadAndGenerate(page, "/mini/", SMALL);
  assert.equal(after.error, undefined, after.error);
  assert.deepEqual(after.latents, first.r.latents);
  const estimate = await page.evaluate(() => window.instaflow.storageEstimate());
  assert.ok(estimate.usage > 0, JSON.stringify(estimate));
  console.log(`first load ${first.bytes} B served, second 0 B, after a changed unet ${third.bytes} B; cache usage ${estimate.usage} B`);
});

test("hf: ids read the Hugging Face Hub layout; a server that ignores Range or compresses still works", async () => {
  const page = await sharedPage();
  const hub = await loadAndGenerate(page, "hf:org/mini", { ...SMALL, cache: false, hfEndpoint: server.url });
  assert.equal(hub.error, undefined, hub.error);
  assert.ok(maxDiff(hub.latents, native) <= 1e-3);
  const urls = await page.evaluate(() => {
    const r = window.instaflow.resolveModelUrl;
    return [r("hf:XCLiu/instaflow_0_9B_from_sd_1_5"), r("hf:a/b@v2"), r("https://huggingface.co/a/b"), r("https://huggingface.co/a/b/tree/dev"), r("/x/y"), r("hf:a/b", { hfEndpoint: "http://127.0.0.1:9/" })];
  });
  assert.deepEqual(urls.slice(0, 4), [
    "https://huggingface.co/XCLiu/instaflow_0_9B_from_sd_1_5/resolve/main/",
    "https://huggingface.co/a/b/resolve/v2/",
    "https://huggingface.co/a/b/resolve/main/",
    "https://huggingface.co/a/b/resolve/dev/",
  ]);
  assert.ok(urls[4].endsWith("/x/y/"));
  assert.equal(urls[5], "http://127.0.0.1:9/a/b/resolve/main/");

  const noRange = await serve([`/=${PAGE}`, `/instaflow=${path.join(ROOT, "web")}`, `/mini=${MINI}`], ["--no-range"]);
  try {
    // Read across origins from the shared page (the server allows it), as from a model host.
    const r = await loadAndGenerate(await sharedPage(), `${noRange.url}mini/`, { ...SMALL, cache: false });
    assert.equal(r.error, undefined, r.error);
    assert.ok(maxDiff(r.latents, native) <= 1e-3);
    const served = await (await fetch(`${noRange.url}__stats`)).json();
    const files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"];
    const total = files.reduce((n, f) => n + fs.statSync(path.join(MINI, f)).size, 0);
    // Each weight file read from its start once for the weights (plus the header reads).
    assert.ok(served.bytes < 3 * total, `without Range: ${served.bytes} bytes served for ${total} bytes of weights`);
  } finally {
    noRange.close();
  }

  // A server that compresses whole files (HEAD's Content-Length is then the compressed size, not
  // the file's) and serves ranges plain: the same latents. Same-origin, where the page sees
  // Content-Encoding; on the CPU backend, which needs no new GPU device for the new page.
  const gz = await serve([`/=${PAGE}`, `/instaflow=${path.join(ROOT, "web")}`, `/mini=${MINI}`], ["--gzip"]);
  try {
    const p = await openPage(gpu, gz.url);
    const r = await loadAndGenerate(p, "/mini/", { ...SMALL, cache: false, backend: "cpu" });
    assert.equal(r.error, undefined, r.error);
    assert.ok(maxDiff(r.latents, native) <= 1e-3);
    await p.close();
  } finally {
    gz.close();
  }
});

test("precision: f16 is refused on an adapter without shader-f16, naming the feature; the page then loads in f32", async () => {
  const page = await sharedPage();
  const hasF16 = await page.evaluate(async () => (await navigator.gpu.requestAdapter()).features.has("shader-f16"));
  assert.equal(hasF16, false, "this test expects SwiftShader, which has no shader-f16");
  const refused = await loadAndGenerate(page, "/mini/", { backend: "webgpu", precision: "f16", cache: false });
  assert.match(refused.error ?? "", /precision "f16": .*lacks the `shader-f16` feature/);
  const bad = await loadAndGenerate(page, "/mini/", { backend: "webgpu", precision: "f8", cache: false });
  assert.match(bad.error ?? "", /precision `f8`: expected "auto", "f16" or "f32"/);
  const r = await loadAndGenerate(page, "/mini/", { backend: "webgpu", precision: "f32", cache: false });
  assert.equal(r.error, undefined, r.error);
  assert.equal(r.precision, "f32");
  assert.ok(maxDiff(r.latents, native) <= 1e-3);
});

test("without WebGPU an SD-1.5-size model is refused before any weight byte is fetched; a wrong folder fails naming the tensor", async () => {
  const cpu = await browser({ webgpu: false });
  try {
    const page = await openPage(cpu);
    const before = (await stats()).bytes;
    const r = await loadAndGenerate(page, "/sd15/", { cache: false });
    const served = (await stats()).bytes - before;
    assert.match(r.error ?? "", /CPU \(wasm\) backend holds at most .* WebGPU/);
    const weights = fs.statSync(path.join(SD15, "unet/diffusion_pytorch_model.safetensors")).size;
    // Configs, tokenizer and headers only (the tokenizer's vocabulary is most of it).
    assert.ok(served < 2e6, `${served} bytes served before refusing a model of ${weights} weight bytes`);
    console.log(`refused SD-1.5 size on CPU after ${served} bytes: ${r.error}`);
    // A size whose activations cannot fit in wasm memory is refused before allocating; the model
    // stays usable.
    const big = await page.evaluate(async ({ prompt, SMALL }) => {
      const model = await window.instaflow.InstaFlow.load("/mini/", { ...SMALL, backend: "cpu" });
      const error = await model.generate({ prompt, width: 4096, height: 4096 }).then(() => "generated", (e) => e.message);
      const after = await model.generate({ prompt }).then((img) => `${img.width}×${img.height}`, (e) => e.message);
      model.free();
      return { error, after };
    }, { prompt: PROMPT, SMALL });
    assert.match(big.error, /a 4096×4096 image needs at least \d+ MB of wasm memory .* the CPU \(wasm\) backend has 4 GB at most/);
    assert.equal(big.after, "64×64");
    await page.close();
  } finally {
    await cpu.close();
  }
  // A UNet config that does not fit the weights: named tensors, no weight fetched.
  const wrong = path.join(work, "wrong");
  fs.cpSync(MINI, wrong, { recursive: true });
  const cfgPath = path.join(wrong, "unet/config.json");
  const cfg = JSON.parse(fs.readFileSync(cfgPath, "utf8"));
  cfg.block_out_channels = [32, 64, 64, 96];
  fs.writeFileSync(cfgPath, JSON.stringify(cfg));
  const s = await serve([`/=${PAGE}`, `/instaflow=${path.join(ROOT, "web")}`, `/wrong=${wrong}`]);
  try {
    const page = await openPage(gpu, s.url);
    const before = (await (await fetch(`${s.url}__stats`)).json()).bytes;
    const r = await loadAndGenerate(page, "/wrong/", { cache: false });
    const served = (await (await fetch(`${s.url}__stats`)).json()).bytes - before;
    assert.match(r.error ?? "", /unet\/diffusion_pytorch_model\.safetensors does not match the model[\s\S]*expected shape/);
    assert.ok(served < 2e6, `${served} bytes served before the mismatch was found`);
    await page.close();
  } finally {
    s.close();
  }
});

test("the page warns before downloading InstaFlow-0.9B, then streams it from the Hub layout with progress", async () => {
  const hub = await serve([
    `/=${path.join(ROOT, "www")}`, `/instaflow=${path.join(ROOT, "web")}`, `/models=${path.join(ROOT, "models")}`,
    `/XCLiu/instaflow_0_9B_from_sd_1_5/resolve/main=${MINI}`,
  ]);
  try {
    const page = await gpu.page();
    await page.goto(`${hub.url}?hub=${encodeURIComponent(hub.url)}`);
    await page.waitForFunction(() => window.instaflowPage?.last || window.instaflowPage?.error, null, { timeout: 120_000 });
    assert.equal(await page.evaluate(() => window.instaflowPage.error), null);
    const before = (await (await fetch(`${hub.url}__stats`)).json()).bytes;
    assert.equal(await page.isVisible("#big-model"), false, "the download warning shows only once the big model is chosen");
    await page.selectOption("#model", "instaflow-0.9b");
    await page.waitForSelector("#big-model", { state: "visible" });
    assert.match(await page.textContent("#big-model"), /about 4 GB/);
    await new Promise((r) => setTimeout(r, 500));
    const idle = (await (await fetch(`${hub.url}__stats`)).json()).bytes - before;
    assert.equal(idle, 0, "nothing is downloaded before the user agrees");
    await page.click("#big-model-go");
    assert.equal(await page.isVisible("#big-model"), false);
    await page.waitForFunction(() => window.instaflowPage.last?.width === 64 || window.instaflowPage.error, null, { timeout: 120_000 });
    const state = await page.evaluate(() => window.instaflowPage);
    assert.equal(state.error, null, state.error);
    assert.match(await page.textContent("#load-status"), /InstaFlow-0\.9B · WebGPU, f32/);
    assert.match(await page.textContent("#storage"), /Stored by this page: [\d.]+ MB/);
    await page.close();
  } finally {
    hub.close();
  }
});
