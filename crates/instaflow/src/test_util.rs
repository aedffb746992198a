//! Helpers shared by the unit tests.

use burn::tensor::{Tensor, backend::Backend};

/// The backend unit tests run on.
pub type TB = burn::backend::Flex;

/// Its device.
pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

/// A tensor's values as `f32`.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}
