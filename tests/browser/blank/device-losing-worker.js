// The package's model worker, plus a way for the tests to lose its GPU device: a
// `{ destroyDevice: true }` message calls `destroy()` on the last `GPUDevice` the worker asked for
// (as a driver reset would end it) and answers `{ deviceLost: reason }` once the device says so.
import "/instaflow/worker.js";

const devices = [];
const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (...args) {
  const device = await requestDevice.apply(this, args);
  devices.push(device);
  return device;
};

self.addEventListener("message", async ({ data }) => {
  if (data?.destroyDevice) {
    const device = devices.at(-1);
    device.destroy();
    const info = await device.lost;
    self.postMessage({ deviceLost: info.reason });
  }
});
