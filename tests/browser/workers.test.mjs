// The package's API under stress in headless Chromium: cancelled loads, repeated loads and frees,
// concurrent and cancelled generations, a crashing model worker and a lost GPU device, in the page
// and in a worker. The built-in model keeps each new GPU device's shader compilation short.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ROOT, browser, cli, gaussian, maxDiff, readSafetensors, serve, writeSafetensors } from "./harness.mjs";

const work = fs.mkdtempSync(path.join(os.tmpdir(), "instaflow-workers-"));
const PAGE = path.join(ROOT, "tests/browser/blank");
const MODEL = "/models/instaflow-shapes/";
const PROMPT = "a red heart";
/** Small pieces and requests, so that a load makes many requests (and can be cancelled mid-way). */
const SMALL = { pieceBytes: 16384, requestBytes: 65536 };

let server;
let noise;
let native;
let gpu;

before(async () => {
  noise = gaussian(3 * 32 * 32, 5);
  writeSafetensors(path.join(work, "noise.safetensors"), "noise", [1, 3, 32, 32], noise);
  cli(
    "--backend", "cpu", "generate", PROMPT, "--noise", path.join(work, "noise.safetensors"),
    "--save-latents", path.join(work, "latents.safetensors"), "--out", path.join(work, "native.png"),
  );
  native = readSafetensors(path.join(work, "latents.safetensors")).values;
  server = await serve([`/=${PAGE}`, `/instaflow=${path.join(ROOT, "web")}`, `/models=${path.join(ROOT, "models")}`]);
  gpu = await browser({ webgpu: true });
});

after(async () => {
  await gpu?.close();
  server?.close();
  fs.rmSync(work, { recursive: true, force: true });
});

async function openPage() {
  const page = await gpu.page();
  await page.goto(server.url);
  await page.waitForFunction(() => window.instaflow);
  await page.evaluate(() => window.instaflow.init());
  return page;
}

test("loads can be cancelled, and a model loaded and freed again and again (WebGPU in-page and in a worker, CPU) gives the same image", async () => {
  const page = await openPage();
  const result = await page.evaluate(
    async ({ noise, prompt, SMALL, MODEL }) => {
      const { InstaFlow, InstaFlowWorker } = window.instaflow;
      const out = { cancelled: [], latents: [] };
      // Each worker sets up its own GPU device (and compiles its shaders): two suffice there.
      for (const [Kind, backend, times] of [[InstaFlow, "webgpu", 3], [InstaFlowWorker, "webgpu", 2], [InstaFlow, "cpu", 3]]) {
        const controller = new AbortController();
        try {
          await Kind.load(MODEL, { ...SMALL, backend, cache: false, signal: controller.signal, onProgress: () => controller.abort() });
          out.cancelled.push("not cancelled");
        } catch (e) {
          out.cancelled.push(e.name);
        }
        for (let i = 0; i < times; i++) {
          const model = await Kind.load(MODEL, { ...SMALL, backend });
          const image = await model.generate({ prompt, noise: new Float32Array(noise), latents: true });
          out.latents.push(Array.from(image.latents));
          model.free();
        }
      }
      return out;
    },
    { noise, prompt: PROMPT, SMALL, MODEL },
  );
  assert.deepEqual(result.cancelled, ["AbortError", "AbortError", "AbortError"]);
  assert.equal(result.latents.length, 8);
  for (const l of result.latents) assert.ok(maxDiff(l, native) <= 1e-3);
  await page.close();
});

test("generate calls are serialized and can be cancelled; a crashed worker is replaced on the next request", async () => {
  const page = await openPage();
  const r = await page.evaluate(
    async ({ prompt, SMALL, MODEL }) => {
      const { InstaFlow, InstaFlowWorker } = window.instaflow;
      const seeds = [...Array(6).keys()];
      const diff = (a, b) => Math.max(...Array.from(a.latents, (x, i) => Math.abs(x - b.latents[i])));
      const worst = (images, reference) => Math.max(...images.map((img, i) => diff(img, reference[i])));
      const out = {};

      // In the page: six calls at once give what the same calls give one after another.
      const local = await InstaFlow.load(MODEL, { ...SMALL, backend: "webgpu" });
      const sequential = [];
      for (const seed of seeds) sequential.push(await local.generate({ prompt, seed, latents: true }));
      out.seedsDiffer = diff(sequential[0], sequential[1]);
      const finished = [];
      const together = await Promise.all(seeds.map((seed) => local.generate({ prompt, seed, latents: true }).then((img) => (finished.push(seed), img))));
      out.localConcurrent = worst(together, sequential);
      out.finished = finished;
      // A cancelled call rejects at once; the calls around it still run.
      const controller = new AbortController();
      const calls = [1, 2, 3].map((seed) => local.generate({ prompt, seed, latents: true, signal: seed === 2 ? controller.signal : undefined }));
      controller.abort();
      const settled = await Promise.allSettled(calls);
      out.localCancel = settled.map((s) => (s.status === "fulfilled" ? "ok" : s.reason.name));
      out.localAround = Math.max(diff(settled[0].value, sequential[1]), diff(settled[2].value, sequential[3]));
      local.free();

      // In a worker: the same, then a running generation cancelled, then a crash.
      const started = [];
      const spawn = () => {
        const w = new Worker("/crashing-worker.js", { type: "module" });
        started.push(w);
        return w;
      };
      const remote = await InstaFlowWorker.load(MODEL, { ...SMALL, backend: "webgpu", worker: spawn });
      const four = seeds.slice(0, 4);
      out.workerConcurrent = worst(await Promise.all(four.map((seed) => remote.generate({ prompt, seed, latents: true }))), sequential);
      const stop = new AbortController();
      const running = remote.generate({ prompt, seed: 4, latents: true, signal: stop.signal });
      await new Promise((resolve) => setTimeout(resolve, 0)); // its request is in the worker now
      stop.abort();
      out.workerCancel = await running.then(() => "ok", (e) => e.name);
      out.workersAfterCancel = started.length;
      out.afterCancel = diff(await remote.generate({ prompt, seed: 4, latents: true }), sequential[4]);
      out.workersAfterNext = started.length;

      const crashes = [];
      remote.onCrash = (e) => crashes.push(e.message);
      started.at(-1).postMessage({ crash: true });
      const t0 = performance.now();
      while (!remote.crashes && performance.now() - t0 < 10_000) await new Promise((resolve) => setTimeout(resolve, 20));
      const recovered = await remote.generate({ prompt, seed: 5, latents: true });
      out.crashes = crashes;
      out.recoveredFrom = recovered.recoveredFrom;
      out.afterCrash = diff(recovered, sequential[5]);
      out.workers = started.length;
      remote.free();
      return out;
    },
    { prompt: PROMPT, SMALL, MODEL },
  );
  assert.ok(r.seedsDiffer > 1e-2, `seeds 0 and 1 give different latents (${r.seedsDiffer})`);
  assert.ok(r.localConcurrent <= 1e-6, `6 concurrent in-page calls vs sequential: ${r.localConcurrent}`);
  assert.deepEqual(r.finished, [0, 1, 2, 3, 4, 5], "one at a time, in the order called");
  assert.deepEqual(r.localCancel, ["ok", "AbortError", "ok"]);
  assert.ok(r.localAround <= 1e-6);
  assert.ok(r.workerConcurrent <= 1e-5, `4 concurrent worker calls vs sequential in-page: ${r.workerConcurrent}`);
  assert.equal(r.workerCancel, "AbortError");
  assert.equal(r.workersAfterCancel, 1, "cancelling ends the worker; none is started until needed");
  assert.equal(r.workersAfterNext, 2);
  assert.ok(r.afterCancel <= 1e-5);
  assert.equal(r.crashes.length, 1);
  assert.match(r.crashes[0], /the model worker crashed: .*simulated crash/);
  assert.match(r.recoveredFrom, /simulated crash/);
  assert.ok(r.afterCrash <= 1e-5);
  assert.equal(r.workers, 3);
  await page.close();
});

test("a lost GPU device gives one clear error; loading again (in the page) or the next request (worker) works on a new device", async () => {
  const page = await openPage();
  const r = await page.evaluate(
    async ({ prompt, SMALL, MODEL }) => {
      const { InstaFlow, InstaFlowWorker } = window.instaflow;
      const diff = (a, b) => Math.max(...Array.from(a.latents, (x, i) => Math.abs(x - b.latents[i])));
      const attempt = (promise) => promise.then(() => "ok", (e) => `${e.deviceLost ? "deviceLost " : ""}${e.message}`);
      const { devices } = await import("/gpu-devices.js");
      const out = {};

      // In the page: the device is lost between two generations.
      let local = await InstaFlow.load(MODEL, { ...SMALL, backend: "webgpu" });
      const reference = await local.generate({ prompt, seed: 1, latents: true });
      devices.at(-1).destroy();
      out.reason = (await devices.at(-1).lost).reason;
      out.idleLoss = await attempt(local.generate({ prompt, seed: 1, latents: true }));
      out.afterLoss = await attempt(local.generate({ prompt, seed: 1 }));
      local.free();
      local = await InstaFlow.load(MODEL, { ...SMALL, backend: "webgpu" });
      out.reloaded = diff(await local.generate({ prompt, seed: 1, latents: true }), reference);
      // ... and during one.
      const running = local.generate({ prompt, seed: 1, latents: true });
      await new Promise((resolve) => setTimeout(resolve, 0));
      devices.at(-1).destroy();
      out.runningLoss = await attempt(running);
      local.free();
      local = await InstaFlow.load(MODEL, { ...SMALL, backend: "webgpu" });
      out.reloadedAgain = diff(await local.generate({ prompt, seed: 1, latents: true }), reference);
      local.free();
      out.pageDevices = devices.length;

      // In a worker: the next request after a loss runs in a new worker on a new device.
      const started = [];
      const spawn = () => {
        const w = new Worker("/device-losing-worker.js", { type: "module" });
        started.push(w);
        return w;
      };
      const remote = await InstaFlowWorker.load(MODEL, { ...SMALL, backend: "webgpu", worker: spawn });
      const crashes = [];
      remote.onCrash = (e) => crashes.push(e.message);
      // Lost right after the load (before any shader is compiled for it: each new device costs a
      // compilation of every shader, half a minute on a software adapter).
      const lost = new Promise((resolve) => started.at(-1).addEventListener("message", ({ data }) => data?.deviceLost && resolve(data.deviceLost)));
      started.at(-1).postMessage({ destroyDevice: true });
      out.workerReason = await lost;
      const recovered = await remote.generate({ prompt, seed: 1, latents: true });
      out.workerRecovered = diff(recovered, reference);
      out.recoveredFrom = recovered.recoveredFrom;
      // ... and during a generation.
      const during = remote.generate({ prompt, seed: 1, latents: true });
      await new Promise((resolve) => setTimeout(resolve, 20));
      started.at(-1).postMessage({ destroyDevice: true });
      const again = await during;
      out.workerDuring = diff(again, reference);
      out.recoveredDuring = again.recoveredFrom;
      out.crashes = crashes;
      out.workers = started.length;
      remote.free();
      return out;
    },
    { prompt: PROMPT, SMALL, MODEL },
  );
  assert.equal(r.reason, "destroyed");
  assert.match(r.idleLoss, /^deviceLost the GPU device was lost \(Destroyed.*\); the model must be loaded again$/);
  assert.match(r.afterLoss, /^deviceLost the GPU device was lost/, "the model stays refused until it is loaded again");
  assert.ok(r.reloaded <= 1e-6, `loaded again on a new device: ${r.reloaded}`);
  assert.match(r.runningLoss, /^deviceLost the GPU device was lost/);
  assert.ok(r.reloadedAgain <= 1e-6, `loaded again after a loss during a generation: ${r.reloadedAgain}`);
  assert.equal(r.pageDevices, 3);
  assert.equal(r.workerReason, "destroyed");
  assert.ok(r.workerRecovered <= 1e-5, `worker after the loss: ${r.workerRecovered}`);
  assert.match(r.recoveredFrom, /the GPU device was lost/);
  assert.ok(r.workerDuring <= 1e-5, `worker after a loss during a generation: ${r.workerDuring}`);
  assert.match(r.recoveredDuring, /the GPU device was lost/);
  assert.equal(r.crashes.length, 2);
  assert.equal(r.workers, 3);
  await page.close();
});

