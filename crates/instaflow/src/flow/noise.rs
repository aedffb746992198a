//! Seeded Gaussian noise `X0 ~ N(0, I)`, generated on the CPU.
//!
//! Backends seed their own generators differently, so noise is drawn with ChaCha8 on the host and
//! uploaded: the same seed gives bit-identical `X0` on every backend, natively and in wasm.

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A seeded host-side random generator (ChaCha8: portable and reproducible across platforms).
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` standard-normal samples from `rng`.
pub fn standard_normal(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// A tensor of standard-normal noise of the given shape, drawn from `rng`.
pub fn gaussian<B: Backend, const D: usize>(
    rng: &mut impl Rng,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(standard_normal(rng, n), shape), device)
}

/// Initial latents from a safetensors file: exactly one finite f32 tensor `[B, channels, h, w]`.
/// Returns its shape and values, or a message naming what is wrong.
pub fn from_safetensors(bytes: &[u8], channels: usize) -> Result<(Vec<usize>, Vec<f32>), String> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file ({e})"))?;
    let names = st.names();
    if names.len() != 1 {
        return Err(format!(
            "expected exactly one tensor, found {}",
            names.len()
        ));
    }
    let t = st.tensor(names[0]).map_err(|e| e.to_string())?;
    if t.dtype() != Dtype::F32 {
        return Err(format!(
            "tensor `{}` is {:?}, expected F32",
            names[0],
            t.dtype()
        ));
    }
    let shape = t.shape().to_vec();
    if !(shape.len() == 4 && shape[1] == channels && shape.iter().all(|&d| d > 0)) {
        return Err(format!(
            "tensor `{}` has shape {shape:?}, expected [B, {channels}, h, w]",
            names[0]
        ));
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {} (noise must be finite)", values[i]));
    }
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let a = standard_normal(&mut rng(7), 20_000);
        let b = standard_normal(&mut rng(7), 20_000);
        assert_eq!(a, b);
        assert_ne!(a, standard_normal(&mut rng(8), 20_000));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
