//! InstaFlow in the browser: wasm-bindgen bindings over the `instaflow` core crate, running on
//! burn's WebGPU backend.

use burn::backend::WebGpu;
use burn::backend::wgpu::{WgpuDevice, graphics, init_setup_async};
use burn::tensor::Tensor;
use wasm_bindgen::prelude::*;

/// The package version (the core crate's version).
#[wasm_bindgen]
pub fn version() -> String {
    instaflow::version().to_string()
}

/// Initialise WebGPU and take one Euler step `x1 = x0 + v` of a straight velocity field on the
/// GPU; resolves to the sum of `x1` (expected: 12). Rejects with a readable error when WebGPU is
/// unavailable.
#[wasm_bindgen(js_name = webgpuSelfTest)]
pub async fn webgpu_self_test() -> Result<f64, JsError> {
    let device = WgpuDevice::default();
    init_setup_async::<graphics::WebGpu>(&device, Default::default()).await;
    let x0 = Tensor::<WebGpu, 2>::from_floats([[1.0, 2.0, 3.0]], &device);
    let v = Tensor::<WebGpu, 2>::from_floats([[2.0, 2.0, 2.0]], &device);
    let step = |x: Tensor<WebGpu, 2>, _t: f64| x.zeros_like() + v.clone();
    let x1 = instaflow::solvers::euler(&step, x0, 0.0, 1.0, 1, false).x;
    let data = x1
        .sum()
        .into_data_async()
        .await
        .map_err(|e| JsError::new(&format!("reading back from the GPU: {e:?}")))?;
    let values = data
        .to_vec::<f32>()
        .map_err(|e| JsError::new(&format!("unexpected data: {e:?}")))?;
    Ok(values[0] as f64)
}
