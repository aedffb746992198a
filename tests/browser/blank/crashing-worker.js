// The package's model worker, plus a way for the tests to crash it: a `{ crash: true }` message
// throws an uncaught error in the worker, as a failing worker would.
import "/instaflow/worker.js";

self.addEventListener("message", ({ data }) => {
  if (data?.crash) {
    setTimeout(() => {
      throw new Error("simulated crash");
    });
  }
});
