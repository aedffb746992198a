// The npm package as a user gets it: `npm pack` of web/, installed into a fresh folder, imported by
// a plain ESM page through an import map and by a Vite-built page, and type-checked from TypeScript.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ARTIFACTS, ROOT, browser, serve } from "./harness.mjs";

const npm = (args, cwd) => execFileSync("npm", args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

let fresh;
let packed;

before(() => {
  fresh = fs.mkdtempSync(path.join(os.tmpdir(), "instaflow-fresh-page-"));
  [packed] = JSON.parse(npm(["pack", "--json", "--pack-destination", fresh], path.join(ROOT, "web")));
  fs.writeFileSync(path.join(fresh, "package.json"), JSON.stringify({ name: "fresh-page", private: true, type: "module" }));
  npm(["install", "--offline", "--no-audit", "--no-fund", `./${packed.filename}`], fresh);
});

after(() => fs.rmSync(fresh, { recursive: true, force: true }));

test("npm pack ships the module, the wasm, the worker and the types", () => {
  const files = packed.files.map((f) => f.path);
  for (const f of ["index.js", "index.d.ts", "loader.js", "worker.js", "package.json", "README.md", "pkg/instaflow_wasm.js", "pkg/instaflow_wasm_bg.wasm"]) {
    assert.ok(files.includes(f), `${f} missing from the tarball (has ${files.join(", ")})`);
  }
  console.log(`tarball ${packed.filename}: ${(packed.size / 1e6).toFixed(1)} MB packed, ${(packed.unpackedSize / 1e6).toFixed(1)} MB unpacked`);
});

/** What both fresh pages run: the worker (on `backend`) and the in-page model (CPU) on the same
 * seed. */
const use = (backend) => `import { InstaFlow, InstaFlowWorker } from "instaflow";
try {
  const gen = await InstaFlowWorker.load("/model/", { backend: "${backend}" });
  const a = await gen.generate({ prompt: "red heart", seed: 3 });
  gen.free();
  const local = await InstaFlow.load("/model/", { backend: "cpu" });
  const b = await local.generate({ prompt: "red heart", seed: 3 });
  local.free();
  window.result = { backends: [a.backend, b.backend], size: [a.width, a.height], same: a.rgba.every((v, i) => Math.abs(v - b.rgba[i]) <= 2) };
} catch (e) {
  window.result = { error: String(e) };
}
`;

/** Serve `dir` with the built-in model at /model/, open it, and check what `use(backend)` reports. */
async function runPage(dir, backend) {
  const server = await serve([`/=${dir}`, `/model=${path.join(ROOT, "models/instaflow-shapes")}`]);
  const b = await browser({ webgpu: true });
  try {
    const page = await b.page();
    await page.goto(server.url);
    await page.waitForFunction(() => window.result, null, { timeout: 180_000 });
    const result = await page.evaluate(() => window.result);
    assert.equal(result.error, undefined, result.error);
    assert.deepEqual(result.backends, [backend, "cpu"]);
    assert.deepEqual(result.size, [32, 32]);
    assert.ok(result.same, `worker (${backend}) and in-page (CPU) images differ`);
  } finally {
    await b.close();
    server.close();
  }
}

test("the installed package imports and generates in a fresh plain ESM page", async () => {
  fs.writeFileSync(path.join(fresh, "use.js"), use("webgpu"));
  fs.writeFileSync(
    path.join(fresh, "index.html"),
    `<!doctype html>
<script type="importmap">{ "imports": { "instaflow": "./node_modules/instaflow/index.js" } }</script>
<script type="module" src="./use.js"></script>`,
  );
  await runPage(fresh, "webgpu");
});

test("a Vite build of a fresh page bundles the worker and the wasm and runs", async () => {
  const app = path.join(fresh, "vite-app");
  fs.mkdirSync(app, { recursive: true });
  // The worker on the CPU: this test is about the bundle (WebGPU in a worker is tested above).
  fs.writeFileSync(path.join(app, "main.js"), use("cpu"));
  fs.writeFileSync(path.join(app, "index.html"), `<!doctype html>\n<script type="module" src="./main.js"></script>`);
  const vite = path.join(ROOT, "tests/browser/node_modules/vite/bin/vite.js");
  execFileSync(process.execPath, [vite, "build", "--logLevel", "warn"], { cwd: app, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  const assets = fs.readdirSync(path.join(app, "dist/assets"));
  assert.ok(assets.some((f) => f.endsWith(".wasm")), `no wasm asset in ${assets.join(", ")}`);
  assert.ok(assets.some((f) => f.startsWith("worker")), `no worker chunk in ${assets.join(", ")}`);
  await runPage(path.join(app, "dist"), "cpu");
});

test("the TypeScript declarations type-check a typical use", () => {
  fs.writeFileSync(
    path.join(fresh, "use.ts"),
    `import { InstaFlow, InstaFlowWorker, type GeneratedImage } from "instaflow";
const gen: InstaFlowWorker = await InstaFlowWorker.load("/model/", { onProgress: (p) => console.log(p.loaded / p.total) });
const image: GeneratedImage = await gen.generate({ prompt: "red heart", seed: 1, guidance: 1, steps: 1 });
const data: ImageData = new ImageData(image.rgba, image.width, image.height);
const ms: number = image.timings.totalMs + data.width;
const local = await InstaFlow.load({ "unet/config.json": new Blob([]) }, { backend: "cpu" });
local.free();
// @ts-expect-error prompt is required
await gen.generate({ seed: 1 });
export { ms };
`,
  );
  const tsc = path.join(ROOT, "tests/browser/node_modules/typescript/bin/tsc");
  const args = ["--noEmit", "--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext", "--lib", "es2022,dom", "use.ts"];
  try {
    execFileSync(process.execPath, [tsc, ...args], { cwd: fresh, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    assert.fail(`tsc rejected the declarations:\n${e.stdout}${e.stderr}`);
  }
  fs.copyFileSync(path.join(fresh, packed.filename), path.join(ARTIFACTS, packed.filename));
});
