//! Choosing a burn backend at run time (`--backend auto|cpu|ndarray|wgpu|cuda`).

use anyhow::{Result, bail, ensure};
use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
use burn::tensor::{FloatDType, IntDType, set_default_dtypes};
use clap::ValueEnum;
use cubecl::Runtime;

/// The backend named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA if a driver is present, else wgpu on a real GPU, else cpu.
    Auto,
    /// burn's `flex` CPU backend (SIMD + threads): the fastest CPU backend measured here.
    Cpu,
    /// burn's `ndarray` CPU backend (for comparison).
    Ndarray,
    /// wgpu (WGSL shaders; Vulkan, Metal or DX12 underneath): the code path the browser uses.
    Wgpu,
    /// NVIDIA CUDA (driver and NVRTC are loaded at run time).
    Cuda,
}

/// A resolved backend and its device.
#[derive(Debug, Clone)]
pub enum Selected {
    /// flex on the CPU.
    Cpu,
    /// ndarray on the CPU.
    Ndarray,
    /// wgpu on the given adapter.
    Wgpu(WgpuDevice),
    /// CUDA device 0.
    #[cfg(feature = "cuda")]
    Cuda(burn::backend::cuda::CudaDevice),
}

impl Selected {
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Selected::Cpu => "cpu (flex)",
            Selected::Ndarray => "cpu (ndarray)",
            Selected::Wgpu(_) => "wgpu",
            #[cfg(feature = "cuda")]
            Selected::Cuda(_) => "cuda",
        }
    }
}

/// Run `$body` with the type alias `$B` bound to the selected backend (wrapped in `Autodiff` when
/// `autodiff` is given, with the checkpoint strategy `C` for `autodiff<C>`) and `$device` to its
/// device.
#[macro_export]
macro_rules! with_backend {
    (autodiff<$C:ty> $sel:expr, $B:ident, $device:ident => $body:expr) => {
        $crate::with_backend!(@inner $sel, $B, $device, [$C], $body)
    };
    (autodiff $sel:expr, $B:ident, $device:ident => $body:expr) => {
        $crate::with_backend!(
            @inner $sel, $B, $device,
            [burn::backend::autodiff::checkpoint::strategy::NoCheckpointing], $body
        )
    };
    ($sel:expr, $B:ident, $device:ident => $body:expr) => {
        $crate::with_backend!(@inner $sel, $B, $device, [], $body)
    };
    (@wrap [], $T:ty) => { $T };
    (@wrap [$C:ty], $T:ty) => { burn::backend::Autodiff<$T, $C> };
    (@inner $sel:expr, $B:ident, $device:ident, [$($C:ty)?], $body:expr) => {
        match $sel {
            $crate::backend::Selected::Cpu => {
                type $B = $crate::with_backend!(@wrap [$($C)?], burn::backend::Flex);
                let $device = Default::default();
                $body
            }
            $crate::backend::Selected::Ndarray => {
                type $B = $crate::with_backend!(@wrap [$($C)?], burn::backend::NdArray);
                let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
            $crate::backend::Selected::Wgpu(d) => {
                type $B = $crate::with_backend!(@wrap [$($C)?], burn::backend::Wgpu);
                let $device = d.clone();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::Selected::Cuda(d) => {
                type $B = $crate::with_backend!(@wrap [$($C)?], burn::backend::Cuda);
                let $device = d.clone();
                $body
            }
        }
    };
}

/// What `backends` and `auto` need to know of a wgpu adapter.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    /// The adapter's name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Discrete, integrated, virtual or CPU.
    pub kind: wgpu::DeviceType,
    /// The graphics API underneath (Vulkan, Metal, DX12, GL).
    pub api: wgpu::Backend,
    /// Whether shaders can compute in f16 (`--precision f16`).
    pub shader_f16: bool,
}

/// The first wgpu adapter, if any, preferring a real GPU over a software rasteriser.
pub fn wgpu_adapter() -> Option<AdapterInfo> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            AdapterInfo {
                name: i.name,
                kind: i.device_type,
                api: i.backend,
                shader_f16: a.features().contains(wgpu::Features::SHADER_F16),
            }
        })
        .min_by_key(|i| i.kind == wgpu::DeviceType::Cpu)
}

/// Whether the CUDA driver loads and device 0 runs a kernel.
#[cfg(feature = "cuda")]
pub fn cuda_works() -> bool {
    use burn::tensor::Tensor;
    // The driver is loaded lazily and a missing library panics inside cudarc; probe it quietly.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let device = burn::backend::cuda::CudaDevice::default();
        let t = Tensor::<burn::backend::Cuda, 1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar()
    })
    .is_ok();
    std::panic::set_hook(hook);
    ok
}

/// Without the `cuda` feature there is no CUDA backend.
#[cfg(not(feature = "cuda"))]
pub fn cuda_works() -> bool {
    false
}

/// Resolve a choice to a working backend, explaining `auto`'s pick on stderr.
pub fn resolve(choice: BackendChoice) -> Result<Selected> {
    match choice {
        BackendChoice::Cpu => Ok(Selected::Cpu),
        BackendChoice::Ndarray => Ok(Selected::Ndarray),
        BackendChoice::Wgpu => match wgpu_adapter() {
            Some(_) => Ok(Selected::Wgpu(WgpuDevice::DefaultDevice)),
            None => bail!(
                "--backend wgpu: no wgpu adapter found (install GPU drivers, or Mesa's \
                 `mesa-vulkan-drivers` for a software Vulkan device)"
            ),
        },
        BackendChoice::Cuda => {
            #[cfg(feature = "cuda")]
            if cuda_works() {
                return Ok(Selected::Cuda(Default::default()));
            }
            bail!(
                "--backend cuda: no usable CUDA device (the NVIDIA driver and NVRTC must be \
                 installed{})",
                if cfg!(feature = "cuda") {
                    ""
                } else {
                    "; this binary was built without the `cuda` feature: rebuild it with `cargo build --release -p instaflow-cli --features cuda`"
                }
            )
        }
        BackendChoice::Auto => {
            #[cfg(feature = "cuda")]
            if cuda_works() {
                crate::note!("backend: cuda (auto: a CUDA device is present)");
                return Ok(Selected::Cuda(Default::default()));
            }
            match wgpu_adapter() {
                Some(a) if a.kind != wgpu::DeviceType::Cpu => {
                    crate::note!(
                        "backend: wgpu on {} ({:?}) (auto: no CUDA, a GPU adapter is present)",
                        a.name,
                        a.api
                    );
                    Ok(Selected::Wgpu(WgpuDevice::DefaultDevice))
                }
                _ => {
                    crate::note!(
                        "backend: cpu (flex) (auto: no CUDA device and no hardware GPU adapter)"
                    );
                    Ok(Selected::Cpu)
                }
            }
        }
    }
}

/// The float type tensors are computed in (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// 32-bit floats everywhere (every backend; the reference numerics).
    F32,
    /// 16-bit floats on the GPU (wgpu on adapters with `shader-f16`, or CUDA): half the memory.
    F16,
}

/// Make `precision` the default float type of the selected device. Must run before any tensor is
/// created on it: burn fixes a device's default types at its first tensor.
pub fn set_precision(selected: &Selected, precision: Precision) -> Result<()> {
    if precision == Precision::F32 {
        return Ok(());
    }
    let result = match selected {
        Selected::Wgpu(d) => {
            set_default_dtypes::<burn::backend::Wgpu>(d, FloatDType::F16, IntDType::I32)
        }
        #[cfg(feature = "cuda")]
        Selected::Cuda(d) => {
            set_default_dtypes::<burn::backend::Cuda>(d, FloatDType::F16, IntDType::I32)
        }
        _ => {
            bail!("--precision f16 needs --backend wgpu or cuda (the CPU backends compute in f32)")
        }
    };
    result.map_err(|e| {
        anyhow::anyhow!(
            "--precision f16: the {} device cannot compute in f16 (a wgpu adapter needs the \
             `shader-f16` feature): {e:?}",
            selected.name()
        )
    })
}

/// Bytes the device's memory pools hold now: (reserved from the driver, in use by tensors).
/// `None` on the CPU backends, which allocate from the process heap.
pub fn device_memory(selected: &Selected) -> Option<(u64, u64)> {
    let usage = match selected {
        Selected::Wgpu(d) => WgpuRuntime::client(d).memory_usage().ok()?,
        #[cfg(feature = "cuda")]
        Selected::Cuda(d) => cubecl::cuda::CudaRuntime::client(d).memory_usage().ok()?,
        _ => return None,
    };
    Some((usage.bytes_reserved, usage.bytes_in_use))
}

/// Most workers `--devices` accepts (a bound on the threads and model copies it starts).
pub const MAX_WORKERS: usize = 256;

/// The devices of a data-parallel training run (`--devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// This many workers on the CPU (flex), sharing its cores.
    Cpu(usize),
    /// wgpu adapters, by their index in wgpu's list (the order `instaflow backends` reports).
    Wgpu(Vec<usize>),
    /// CUDA devices by ordinal.
    Cuda(Vec<usize>),
}

impl DeviceList {
    /// Parse `cpu:N`, `cuda:0,cuda:1` (or `cuda:0,1`), `wgpu:0,wgpu:1` (or `wgpu:0,1`).
    pub fn parse(spec: &str) -> Result<Self> {
        let usage = "use cpu:N (N CPU workers), cuda:0,1,… or wgpu:0,1,…";
        let mut kind: Option<&str> = None;
        let mut ids = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let index = match part.split_once(':') {
                Some((k, i)) => {
                    if kind.is_some_and(|prev| prev != k) {
                        bail!("--devices `{spec}` mixes device kinds; one kind per run ({usage})");
                    }
                    kind = Some(k);
                    i
                }
                None if kind.is_some() => part,
                None => bail!("--devices `{spec}`: `{part}` names no device kind ({usage})"),
            };
            let index: usize = index
                .parse()
                .map_err(|_| anyhow::anyhow!("--devices `{spec}`: `{index}` is not a number"))?;
            ensure!(
                !ids.contains(&index),
                "--devices `{spec}` names device {index} twice"
            );
            ids.push(index);
        }
        let list = match kind {
            Some("cpu") if ids.len() == 1 => Self::Cpu(ids[0]),
            Some("cpu") => {
                bail!("--devices `{spec}`: the CPU is one device; say cpu:N for N workers")
            }
            Some("cuda") => Self::Cuda(ids),
            Some("wgpu") => Self::Wgpu(ids),
            Some(other) => bail!("--devices `{spec}`: unknown device kind `{other}` ({usage})"),
            None => bail!("--devices is empty ({usage})"),
        };
        ensure!(
            (1..=MAX_WORKERS).contains(&list.len()),
            "--devices `{spec}` asks for {} workers; between 1 and {MAX_WORKERS} are possible",
            list.len()
        );
        Ok(list)
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        match self {
            Self::Cpu(n) => *n,
            Self::Wgpu(ids) | Self::Cuda(ids) => ids.len(),
        }
    }

    /// The backend these devices belong to.
    pub fn backend(&self) -> BackendChoice {
        match self {
            Self::Cpu(_) => BackendChoice::Cpu,
            Self::Wgpu(_) => BackendChoice::Wgpu,
            Self::Cuda(_) => BackendChoice::Cuda,
        }
    }
}

/// The wgpu devices at these positions of wgpu's adapter list, or an error naming the missing one.
pub fn wgpu_devices(ids: &[usize]) -> Result<Vec<WgpuDevice>> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let kinds: Vec<wgpu::DeviceType> =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|a| a.get_info().device_type)
            .collect();
    ids.iter()
        .map(|&i| {
            let Some(&kind) = kinds.get(i) else {
                bail!(
                    "--devices: there is no wgpu adapter {i} (this machine has {}; see `instaflow \
                     backends`)",
                    kinds.len()
                );
            };
            // burn names an adapter by its type and its index among adapters of that type.
            let nth = kinds[..i].iter().filter(|&&k| k == kind).count();
            Ok(match kind {
                wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(nth),
                wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(nth),
                wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(nth),
                _ => WgpuDevice::Cpu,
            })
        })
        .collect()
}

/// The CUDA devices with these ordinals, or an error naming the missing one.
#[cfg(feature = "cuda")]
pub fn cuda_devices(ids: &[usize]) -> Result<Vec<burn::backend::cuda::CudaDevice>> {
    use burn::backend::cuda::CudaDevice;
    ensure!(
        cuda_works(),
        "--devices cuda:…: no usable CUDA device (the NVIDIA driver and NVRTC must be installed)"
    );
    let count = cubecl::cuda::CudaRuntime::client(&CudaDevice::default()).device_count_total();
    ids.iter()
        .map(|&i| {
            ensure!(
                i < count,
                "--devices: there is no CUDA device {i} (this machine has {count})"
            );
            Ok(CudaDevice::new(i))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_bad_ones_say_why() {
        assert_eq!(DeviceList::parse("cpu:4").unwrap(), DeviceList::Cpu(4));
        assert_eq!(
            DeviceList::parse("cuda:0,cuda:1").unwrap(),
            DeviceList::Cuda(vec![0, 1])
        );
        assert_eq!(
            DeviceList::parse("wgpu:1, 0").unwrap(),
            DeviceList::Wgpu(vec![1, 0])
        );
        for (spec, needle) in [
            ("tpu:0", "unknown device kind `tpu`"),
            ("cpu:0", "between 1 and"),
            ("cpu:100000", "between 1 and"),
            ("cpu:1,cpu:2", "the CPU is one device"),
            ("cuda:0,wgpu:1", "mixes device kinds"),
            ("cuda:0,0", "twice"),
            ("cuda:x", "`x` is not a number"),
            ("0,1", "names no device kind"),
        ] {
            let e = DeviceList::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
