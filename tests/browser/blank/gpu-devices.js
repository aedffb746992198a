// Every `GPUDevice` this page or worker asks for, newest last, so that a test can destroy the one
// in use (as a driver reset would end it). Importing the module starts the recording.
export const devices = [];

const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (...args) {
  const device = await requestDevice.apply(this, args);
  devices.push(device);
  return device;
};
