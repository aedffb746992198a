//! The same model on the CPU backend and on wgpu (the WGSL code path the browser uses) must give
//! the same numbers. CI runs wgpu on Mesa's software Vulkan (lavapipe).

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use instaflow::bench::{BlockShape, time_block};
use instaflow::flow::losses::rectified_flow_loss;
use instaflow::flow::noise;
use instaflow::flow::solvers::Solver;
use instaflow::flow::velocity::Guided;
use instaflow::toy::{ToyMlp, ToyMlpConfig};

mod common;

const N: usize = 64;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}: lengths");
    let max = common::max_abs_diff(a, b);
    let scale = a.iter().map(|x| x.abs()).fold(1.0f32, f32::max);
    assert!(
        max <= tol * scale,
        "{name}: max abs difference {max} (scale {scale})"
    );
}

/// Everything the check computes on one backend, from the same weights and inputs.
struct Outputs {
    velocity: Vec<f32>,
    guided_euler4: Vec<f32>,
    loss_before: f32,
    loss_after_adam: f32,
}

fn compute<B: burn::tensor::backend::AutodiffBackend>(
    weights: Vec<u8>,
    device: &B::Device,
) -> Outputs {
    let record = BinBytesRecorder::<FullPrecisionSettings>::default()
        .load(weights, device)
        .expect("record loads");
    let model: ToyMlp<B> = ToyMlpConfig::new(4).init(device).load_record(record);
    let mut rng = noise::rng(11);
    let x0: Tensor<B, 2> = noise::gaussian(&mut rng, [N, 2], device);
    let x1: Tensor<B, 2> = noise::gaussian(&mut rng, [N, 2], device) * 3.0;
    let t = Tensor::<B, 1>::from_data(
        TensorData::new(
            noise::standard_normal(&mut rng, N)
                .iter()
                .map(|v| v.abs().min(1.0))
                .collect::<Vec<f32>>(),
            [N],
        ),
        device,
    );
    let labels: Vec<i64> = (0..N as i64).map(|i| i % 5).collect();
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [N]), device);
    let null = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![4i64; N], [N]), device);

    use instaflow::flow::velocity::VelocityField;
    let velocity = values(model.velocity(x0.clone(), t.clone(), &labels));
    let guided = Guided::with_guidance(&model, &labels, &null, 1.5);
    let guided_euler4 = values(
        Solver::Euler { steps: 4 }
            .solve(&guided, x0.clone(), 0.0, 1.0, false)
            .x,
    );

    let loss = rectified_flow_loss(&model, x0.clone(), x1.clone(), t.clone(), &labels);
    let loss_before = values(loss.clone())[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = AdamConfig::new().init().step(1e-2, model, grads);
    let loss_after_adam = values(rectified_flow_loss(&model, x0, x1, t, &labels))[0];
    Outputs {
        velocity,
        guided_euler4,
        loss_before,
        loss_after_adam,
    }
}

#[test]
fn toy_model_matches_between_cpu_and_wgpu() {
    let cpu_device = Default::default();
    let init: ToyMlp<Flex> = ToyMlpConfig::new(4).init(&cpu_device);
    let weights = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(init.into_record(), ())
        .unwrap();

    let cpu = compute::<Autodiff<Flex>>(weights.clone(), &cpu_device);
    let gpu = compute::<Autodiff<Wgpu>>(weights, &WgpuDevice::DefaultDevice);

    assert_close("velocity", &cpu.velocity, &gpu.velocity, 1e-4);
    assert_close(
        "guided Euler x4",
        &cpu.guided_euler4,
        &gpu.guided_euler4,
        1e-4,
    );
    assert_close("loss", &[cpu.loss_before], &[gpu.loss_before], 1e-4);
    assert_close(
        "loss after one Adam step",
        &[cpu.loss_after_adam],
        &[gpu.loss_after_adam],
        1e-3,
    );
    assert!(
        cpu.loss_after_adam < cpu.loss_before,
        "one Adam step lowers the loss"
    );
}

#[test]
fn conv_matmul_attention_block_runs_on_wgpu() {
    let shape = BlockShape {
        channels: 16,
        size: 16,
        heads: 2,
        seq: 64,
        head_dim: 8,
    };
    let t = time_block::<Wgpu>(&WgpuDevice::DefaultDevice, shape, 1);
    assert!(t.total_ms().is_finite());
}

/// The SD-1.5 building blocks (conv, GroupNorm, attention, GEGLU, up/down-sampling) on wgpu give
/// diffusers' numbers too: the tiny parity UNet and VAE decoder against their goldens.
#[test]
fn sd_models_match_diffusers_on_wgpu() {
    use instaflow::sd::pipeline::{load_unet, load_vae};
    use instaflow::sd::source::ModelSource;

    let dir = common::repo("tests/fixtures/parity/conv-f32");
    let device = WgpuDevice::DefaultDevice;
    let golden = |key: &str| common::golden("conv-f32", key);
    let tensor = |key: &str| -> Tensor<Wgpu, 4> {
        let (shape, v) = golden(key);
        Tensor::from_data(TensorData::new(v, shape), &device)
    };
    let source = ModelSource::dir(&dir);
    let (_, unet) = load_unet::<Wgpu>(&source, "unet", &device).unwrap();
    let (shape, t) = golden("unet.timesteps");
    let timesteps = Tensor::<Wgpu, 1>::from_data(TensorData::new(t, shape), &device);
    let (cs, c) = golden("unet.context");
    let context = Tensor::<Wgpu, 3>::from_data(TensorData::new(c, cs), &device);
    let out = values(unet.forward(tensor("unet.sample"), timesteps, &context));
    assert_close("UNet on wgpu", &out, &golden("unet.out").1, 1e-4);

    let (_, vae) = load_vae::<Wgpu>(&source, "vae", &device).unwrap();
    let decoded = values(vae.decode(tensor("vae.latents")));
    assert_close(
        "VAE decode on wgpu",
        &decoded,
        &golden("vae.decoded").1,
        1e-4,
    );
}
