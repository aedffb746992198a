//! The exponential moving average of the weights (what a run exports).

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::training::model::TextToImage;

/// Flattened float parameters by id (for the EMA).
struct Collect<B: Backend>(HashMap<ParamId, Tensor<B, 1>>);

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.insert(param.id, t.reshape([n]));
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
    let mut current = Collect(HashMap::new());
    model.valid().visit(&mut current);
    ema.map(&mut Blend {
        current: current.0,
        decay,
    })
}
