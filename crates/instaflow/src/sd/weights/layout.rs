//! How a module's parameters are named and laid out in a diffusers/transformers checkpoint, and
//! putting loaded tensors into the module: shared by the whole-file loader ([`super::load`]) and
//! the piece-by-piece one ([`super::stream`]).

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A parameter of a model as its checkpoint stores it: module path, PyTorch layout shape.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    /// burn's path (`…norm1.gamma`).
    pub path: String,
    /// The shape in the file (Linear weights are stored `[out, in]`, burn holds `[in, out]`).
    pub file_shape: Vec<usize>,
    /// A Linear weight: transposed after upload.
    pub transpose: bool,
}

/// Lists a module's parameters by their checkpoint names without initialising them.
#[derive(Default)]
pub(crate) struct ParamLister {
    path: Vec<String>,
    containers: Vec<String>,
    /// Checkpoint name → where and how it goes.
    pub by_name: BTreeMap<String, Expected>,
}

impl ParamLister {
    fn record(&mut self, shape: Vec<usize>) {
        let path = self.path.join(".");
        let module = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:"))
            .map(String::as_str)
            .unwrap_or("");
        let leaf = self.path.last().map(String::as_str).unwrap_or("");
        let stem = &path[..path.len() - leaf.len()];
        let norm = module.ends_with("Norm");
        // PyTorch's names and layout (what burn-store's PyTorch adapter undoes).
        let (name, file_shape, transpose) = match leaf {
            "gamma" if norm => (format!("{stem}weight"), shape, false),
            "beta" if norm => (format!("{stem}bias"), shape, false),
            "weight" if module == "Struct:Linear" && shape.len() == 2 => {
                (path.clone(), vec![shape[1], shape[0]], true)
            }
            _ => (path.clone(), shape, false),
        };
        self.by_name.insert(
            name,
            Expected {
                path,
                file_shape,
                transpose,
            },
        );
    }
}

impl<B: Backend> ModuleVisitor<B> for ParamLister {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.containers.push(container.to_string());
        if !container.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }
    fn exit_module(&mut self, _name: &str, container: &str) {
        self.containers.pop();
        if !container.starts_with("Enum:") {
            self.path.pop();
        }
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.record(param.lazy_shape().to_vec());
    }
}

/// Every parameter of `module` by its checkpoint name (module paths, PyTorch's norm names) with
/// its shape as a checkpoint stores it, without initialising anything.
pub fn checkpoint_layout<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut lister = ParamLister::default();
    module.visit(&mut lister);
    lister
        .by_name
        .into_iter()
        .map(|(name, e)| (name, e.file_shape))
        .collect()
}

/// Puts finished tensors (flattened to 2-D, in burn's layout) into their parameters.
pub(crate) struct ParamSetter<B: Backend> {
    path: Vec<String>,
    tensors: HashMap<String, Tensor<B, 2>>,
}

impl<B: Backend> ParamSetter<B> {
    /// Sets the parameters named (by module path) in `tensors`; others are left as they are.
    pub fn new(tensors: HashMap<String, Tensor<B, 2>>) -> Self {
        Self {
            path: vec![],
            tensors,
        }
    }
}

impl<B: Backend> ModuleMapper<B> for ParamSetter<B> {
    fn enter_module(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }
    fn exit_module(&mut self, _name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.pop();
        }
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.tensors.remove(&self.path.join(".")) {
            Some(t) => {
                let dims: [usize; D] = param.lazy_shape().dims();
                let id = param.id;
                // A transposed Linear weight is a strided view; reshaping it to its own shape
                // would copy it.
                let t = if t.dims()[..] == dims[..] {
                    Tensor::from_primitive(t.into_primitive())
                } else {
                    t.reshape(dims)
                };
                param.transform_for_load(t, id)
            }
            None => param,
        }
    }
}
