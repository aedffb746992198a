//! The exponential moving average of the weights (what a run exports).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::training::model::TextToImage;

/// The trainable float parameters by id, flattened (for the EMA). Frozen ones are left out,
/// so the average keeps their weights bit for bit (and shares their storage).
struct Trainable<B: AutodiffBackend>(HashMap<ParamId, Tensor<B::InnerBackend, 1>>);

impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if t.is_require_grad() {
            let n = t.shape().num_elements();
            self.0.insert(param.id, t.inner().reshape([n]));
        }
    }
}

/// `ema ← decay·ema + (1 − decay)·current`, parameter by parameter.
struct Blend<B: Backend> {
    current: HashMap<ParamId, Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.current.remove(&id) {
            Some(cur) => {
                let shape = tensor.shape();
                tensor * self.decay + cur.reshape(shape) * (1.0 - self.decay)
            }
            None => tensor,
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// `ema` moved towards `model`'s current weights with `decay`.
pub(super) fn update<B: AutodiffBackend>(
    ema: TextToImage<B::InnerBackend>,
    model: &TextToImage<B>,
    decay: f64,
) -> TextToImage<B::InnerBackend> {
    let mut current = Trainable::<B>(HashMap::new());
    model.visit(&mut current);
    ema.map(&mut Blend {
        current: current.0,
        decay,
    })
}
