// The package's model worker, plus a way for the tests to lose its GPU device: a
// `{ destroyDevice: true }` message calls `destroy()` on the last `GPUDevice` the worker asked for
// and answers `{ deviceLost: reason }` once the device says so.
import { devices } from "/gpu-devices.js";
import "/instaflow/worker.js";

self.addEventListener("message", async ({ data }) => {
  if (data?.destroyDevice) {
    const device = devices.at(-1);
    device.destroy();
    const info = await device.lost;
    self.postMessage({ deviceLost: info.reason });
  }
});
