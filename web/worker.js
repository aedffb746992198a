// Module Web Worker entry: runs an `InstaFlow` off the page's main thread. Spoken to by
// `InstaFlowWorker` in ./index.js; messages are `{ id, op, ... }`, replies `{ id, result | error |
// progress }`. Image bytes are transferred, not copied.

import { InstaFlow } from "./index.js";

let model = null;

// A trap inside a GPU callback (a read-back failing because the device was just lost) belongs to
// no call. Hold it a moment: the browser's device-lost notice follows and turns the call in flight
// into a "device was lost" error (the caller then retries on a new device); without that notice,
// it crashes the worker as any other uncaught error.
let heldTrap = false;
self.addEventListener("error", (event) => {
  if (heldTrap || !(event.error instanceof WebAssembly.RuntimeError)) return;
  heldTrap = true;
  event.preventDefault();
  setTimeout(() => {
    if (!globalThis.__instaflowDeviceLost) throw event.error;
  }, 250);
});

self.onmessage = async ({ data }) => {
  const { id, op } = data;
  try {
    if (op === "load") {
      model?.free();
      model = null;
      const onProgress = (progress) => self.postMessage({ id, progress });
      const { backend, precision, wasm, cache, hfEndpoint, pieceBytes, requestBytes } = data;
      model = await InstaFlow.load(data.source, { onProgress, backend, precision, wasm, cache, hfEndpoint, pieceBytes, requestBytes });
      self.postMessage({ id, result: { backend: model.backend, precision: model.precision, noiseShape: model.noiseShape, loadStats: model.loadStats } });
    } else if (op === "generate") {
      if (!model) throw new Error("no model loaded");
      const result = await model.generate(data.options);
      const transfer = [result.rgba.buffer];
      if (result.latents) transfer.push(result.latents.buffer);
      self.postMessage({ id, result }, transfer);
    } else {
      throw new Error(`unknown request ${op}`);
    }
  } catch (e) {
    self.postMessage({ id, error: e?.message ?? String(e), fatal: Boolean(e?.fatal), deviceLost: Boolean(e?.deviceLost) });
  }
};
