//! End-to-end checks of data preparation, training, reflow, distillation and evaluation through
//! the `instaflow` binary, on the committed 8×8 MNIST subset with the `tiny` architecture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::repo;

fn instaflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_instaflow"));
    c.args(["--backend", "cpu"]);
    c
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("instaflow-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command fails with one `error:` line mentioning `needle`.
fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error:") && err.contains(needle),
        "expected {needle:?} in {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn data() -> PathBuf {
    repo("tests/fixtures/data/mnist-8")
}

fn train(out: &Path, extra: &[&str]) -> Output {
    train_command(out, extra).output().unwrap()
}

fn train_command(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = instaflow();
    cmd.args([
        "train",
        "--size",
        "tiny",
        "--batch",
        "8",
        "--checkpoint-every",
        "3",
        "--data",
    ])
    .arg(data())
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

#[test]
fn data_command_reads_the_npm_package_layout() {
    let dir = temp_dir("pkg");
    std::fs::create_dir_all(dir.join("package/src/digits")).unwrap();
    for d in 0..10 {
        let px: Vec<f32> = (0..784 * 2).map(|i| ((i + d) % 7) as f32 / 7.0).collect();
        let json = serde_json::json!({ "data": px });
        std::fs::write(
            dir.join(format!("package/src/digits/{d}.json")),
            json.to_string(),
        )
        .unwrap();
    }
    let out = dir.join("mnist");
    let stdout = ok(instaflow()
        .args(["data", "mnist", "--size", "16", "--from"])
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    assert!(stdout.contains("20 images 1×16×16"), "{stdout}");
    assert!(out.join("images.safetensors").is_file() && out.join("LICENCE.txt").is_file());
    fails(
        instaflow()
            .args(["data", "emoji", "--from"])
            .arg(&dir)
            .arg("--out")
            .arg(dir.join("e"))
            .output()
            .unwrap(),
        "emoji.json",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_resume_reflow_distill_and_eval() {
    let dir = temp_dir("pipeline");
    let run = dir.join("rf");
    ok(train(&run, &["--steps", "4"]));
    for f in [
        "model/unet/diffusion_pytorch_model.safetensors",
        "model/text_encoder/model.safetensors",
        "model/tokenizer/vocab.json",
        "checkpoint/state.json",
        "losses.csv",
        "loss.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // No silent overwrite of a run; --resume continues it.
    fails(train(&run, &["--steps", "6"]), "--resume");
    ok(train(&run, &["--steps", "6", "--resume"]));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["steps_this_run"], 2);
    assert_eq!(
        std::fs::read_to_string(run.join("losses.csv"))
            .unwrap()
            .lines()
            .count(),
        7
    );

    // Pairs in two shards, then 2-RF and distillation from them.
    let pairs = dir.join("pairs");
    for shard in ["0/2", "1/2"] {
        ok(instaflow()
            .args([
                "reflow", "--pairs", "24", "--chunk", "8", "--solver", "euler:2", "--shard", shard,
            ])
            .arg("--model")
            .arg(run.join("model"))
            .arg("--data")
            .arg(data())
            .arg("--out")
            .arg(&pairs)
            .output()
            .unwrap());
    }
    let reflow = dir.join("2rf");
    ok(instaflow()
        .args(["train", "--steps", "3", "--batch", "8"])
        .arg("--pairs")
        .arg(&pairs)
        .arg("--init")
        .arg(run.join("model"))
        .arg("--out")
        .arg(&reflow)
        .output()
        .unwrap());
    let student = dir.join("distill");
    fails(
        instaflow()
            .args(["distill", "--steps", "3"])
            .arg("--pairs")
            .arg(&pairs)
            .arg("--out")
            .arg(&student)
            .output()
            .unwrap(),
        "--init",
    );
    ok(instaflow()
        .args(["distill", "--steps", "3", "--batch", "8"])
        .arg("--pairs")
        .arg(&pairs)
        .arg("--init")
        .arg(reflow.join("model"))
        .arg("--out")
        .arg(&student)
        .output()
        .unwrap());
    // A model of another image shape cannot be trained on this data.
    let emoji = repo("tests/fixtures/data/emoji-16");
    fails(
        instaflow()
            .args(["train", "--steps", "1"])
            .arg("--data")
            .arg(&emoji)
            .arg("--init")
            .arg(run.join("model"))
            .arg("--out")
            .arg(dir.join("x"))
            .output()
            .unwrap(),
        "training data",
    );

    let eval = dir.join("eval");
    let stdout = ok(instaflow()
        .args([
            "eval",
            "--samples",
            "20",
            "--steps",
            "1,2",
            "--path-samples",
            "8",
            "--classifier-epochs",
            "1",
        ])
        .arg("--data")
        .arg(data())
        .arg("--model")
        .arg(format!("2-RF={}", reflow.join("model").display()))
        .arg("--student")
        .arg(format!("2-RF+distill={}", student.join("model").display()))
        .arg("--out")
        .arg(&eval)
        .output()
        .unwrap());
    for row in ["| 2-RF | 1 |", "| 2-RF | 2 |", "| 2-RF+distill | 1 |"] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 3);
    let grid = std::fs::read(eval.join("grid.png")).unwrap();
    assert_eq!(&grid[..4], b"\x89PNG");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_continues_bit_for_bit() {
    let dir = temp_dir("sigint");
    let (whole, cut) = (dir.join("whole"), dir.join("cut"));
    ok(train(&whole, &["--steps", "100"]));
    let child = train_command(&cut, &["--steps", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !cut.join("checkpoint/state.json").is_file() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cut.join("checkpoint/state.json")).unwrap()).unwrap();
    let stopped = state["step"].as_u64().unwrap();
    assert!((3..100).contains(&stopped), "stopped at {stopped}");
    assert!(err.contains(&format!("after step {stopped}:")), "{err}");

    ok(train(&cut, &["--steps", "100", "--resume"]));
    assert_eq!(
        std::fs::read_to_string(whole.join("losses.csv")).unwrap(),
        std::fs::read_to_string(cut.join("losses.csv")).unwrap()
    );
    // Every exported tensor equal bit for bit (the header's metadata order may vary).
    let f = "model/unet/diffusion_pytorch_model.safetensors";
    let (a, b) = (
        std::fs::read(whole.join(f)).unwrap(),
        std::fs::read(cut.join(f)).unwrap(),
    );
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in a.tensors() {
        assert!(
            t.data() == b.tensor(&name).unwrap().data(),
            "{name} differs between the whole run and the one interrupted at step {stopped}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Train 3 steps; `break_it` may plant a fault in the run folder; a `--resume` run with `extra`
/// must then fail saying `needle`, leave the 3-step checkpoint as it was, and (after `repair`) a
/// plain `--resume` continues from it.
fn failed_resume_keeps_the_checkpoint(
    name: &str,
    break_it: impl FnOnce(&Path),
    extra: &[&str],
    needle: &str,
    repair: impl FnOnce(&Path),
) -> String {
    let dir = temp_dir(name);
    let run = dir.join("run");
    ok(train(&run, &["--steps", "3"]));
    let good = std::fs::read(run.join("checkpoint/state.json")).unwrap();
    break_it(&run);
    let out = train(&run, &[&["--resume"], extra].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    fails(out, needle);
    assert_eq!(
        std::fs::read(run.join("checkpoint/state.json")).unwrap(),
        good
    );
    repair(&run);
    ok(train(&run, &["--steps", "6", "--resume"]));
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

#[test]
fn diverging_training_stops_naming_the_step_and_keeps_the_last_good_checkpoint() {
    // A learning rate no model survives: the weights overflow within a step or two.
    let err = failed_resume_keeps_the_checkpoint(
        "diverge",
        |_| {},
        &["--steps", "9", "--lr", "1e38", "--warmup", "0"],
        "lower --lr",
        |_| {},
    );
    assert!(
        err.contains("not finite after step") || err.contains("the loss became"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_that_cannot_be_written_leaves_the_previous_one() {
    // An injected write failure: the new checkpoint's folder cannot be made (a file is there).
    let blocker = |run: &Path| run.join("checkpoint.tmp");
    let err = failed_resume_keeps_the_checkpoint(
        "full-disk",
        |run| std::fs::write(blocker(run), b"in the way").unwrap(),
        &["--steps", "6"],
        "writing the step-6 checkpoint failed",
        |run| std::fs::remove_file(blocker(run)).unwrap(),
    );
    assert!(err.contains("previous checkpoint is kept"), "{err}");
}

/// Run `cmd` under `ulimit -f 16` (8 or 16 KB, as the shell counts blocks): every larger file it
/// writes fails midway, as on a full disk.
fn with_small_disk(cmd: Command) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 16 && exec \"$0\" \"$@\"")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .output()
        .unwrap()
}

#[test]
fn writes_that_fail_midway_keep_the_last_checkpoint_and_pair_chunks() {
    let dir = temp_dir("small-disk");
    let run = dir.join("run");
    ok(train(&run, &["--steps", "3"]));
    let good = std::fs::read(run.join("checkpoint/state.json")).unwrap();
    let out = with_small_disk(train_command(&run, &["--resume", "--steps", "6"]));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    fails(out, "writing the step-6 checkpoint failed");
    assert!(err.contains("the previous checkpoint is kept"), "{err}");
    assert_eq!(
        std::fs::read(run.join("checkpoint/state.json")).unwrap(),
        good
    );
    assert!(!run.join("checkpoint.tmp").exists());
    ok(train(&run, &["--resume", "--steps", "6"]));

    // Reflow pairs: 64 pairs of 8×8 noise and images per chunk (32 KB).
    let pairs = dir.join("pairs");
    let reflow = || {
        let mut c = instaflow();
        c.args([
            "reflow", "--pairs", "128", "--chunk", "64", "--solver", "euler:1",
        ])
        .arg("--model")
        .arg(run.join("model"))
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&pairs);
        c
    };
    let out = with_small_disk(reflow());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    fails(out, "chunk-00000");
    let shard = pairs.join("shard-0-of-1");
    let left: Vec<_> = std::fs::read_dir(&shard)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?} left after: {err}");
    let out = ok(reflow().output().unwrap());
    assert!(
        out.contains("folder holds 128/128 pairs (0 missing"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_nan_in_the_pairs_stops_the_run_or_is_skipped_with_on_nan_skip() {
    let dir = temp_dir("nan-pairs");
    let model = dir.join("rf");
    ok(train(&model, &["--steps", "1"]));
    let pairs = dir.join("pairs");
    ok(instaflow()
        .args([
            "reflow", "--pairs", "16", "--chunk", "16", "--solver", "euler:1",
        ])
        .arg("--model")
        .arg(model.join("model"))
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&pairs)
        .output()
        .unwrap());
    // One NaN in pair 0's noise: every batch that draws it has a NaN loss.
    let chunk = pairs.join("shard-0-of-1/chunk-00000.safetensors");
    let bytes = std::fs::read(&chunk).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut noise = st.tensor("noise").unwrap().data().to_vec();
    noise[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| match name.as_str() {
            "noise" => {
                let v = safetensors::tensor::TensorView::new(t.dtype(), t.shape().to_vec(), &noise)
                    .unwrap();
                (name, v)
            }
            _ => (name, t),
        })
        .collect();
    std::fs::write(&chunk, safetensors::serialize(views, None).unwrap()).unwrap();
    let student = |out: &str, extra: &[&str]| {
        instaflow()
            .args(["train", "--steps", "8", "--batch", "8"])
            .args(extra)
            .arg("--pairs")
            .arg(&pairs)
            .arg("--init")
            .arg(model.join("model"))
            .arg("--out")
            .arg(dir.join(out))
            .output()
            .unwrap()
    };
    fails(student("stop", &[]), "the loss became NaN at step");
    let out = student("skip", &["--on-nan", "skip"]);
    let err = ok(out);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("skip/train.json")).unwrap()).unwrap();
    let skipped = summary["skipped_steps"].as_array().unwrap().len();
    assert!((1..8).contains(&skipped), "{skipped} skipped: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reflow_resumes_after_kill_9_without_gaps_or_duplicates() {
    let dir = temp_dir("kill");
    let model = dir.join("rf");
    ok(train(&model, &["--steps", "1"]));
    let pairs = dir.join("pairs");
    let reflow = || {
        let mut c = instaflow();
        c.args([
            "reflow", "--pairs", "2000", "--chunk", "4", "--batch", "4", "--solver", "euler:8",
        ])
        .arg("--model")
        .arg(model.join("model"))
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&pairs);
        c
    };
    let mut child = reflow()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let chunks = || {
        std::fs::read_dir(pairs.join("shard-0-of-1"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "safetensors")
                })
                .count()
            })
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while chunks() < 3 && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = chunks();
    assert!((3..500).contains(&before), "killed after {before} chunks");
    let stdout = ok(reflow().output().unwrap());
    assert!(
        stdout.contains("holds 2000/2000 pairs (0 missing, 0 duplicated)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{} new pairs", 2000 - 4 * before)),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny SD-structured parity model (ε-prediction, random weights) plus the tokenizer, at `to`.
fn tiny_sd(to: &Path) {
    for part in ["unet", "vae", "text_encoder"] {
        let dst = to.join(part);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(repo("tests/fixtures/parity/conv-f32").join(part)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let tok = to.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(repo("assets/clip-tokenizer").join(f), tok.join(f)).unwrap();
    }
}

/// Random LPIPS weights in `dir`: a VGG16 backbone (torchvision's keys) and linear heads, as
/// safetensors.
fn random_lpips(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, tensors: Vec<(String, Vec<usize>)>| {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .enumerate()
            .map(|(j, (n, shape))| {
                let count: usize = shape.iter().product();
                let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
                // Biases 0; the heads' weights are ≥ 0, as trained LPIPS heads are.
                let head = n.starts_with("lin");
                let values: Vec<f32> = (0..count)
                    .map(|i| {
                        ((0.7 * i as f64 + j as f64).sin() * (2.0 / fan_in as f64).sqrt()) as f32
                    })
                    .map(|v| match (shape.len(), head) {
                        (1, _) => 0.0,
                        (_, true) => v.abs(),
                        _ => v,
                    })
                    .collect();
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n, shape, bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(name)).unwrap();
    };
    let layers = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
    let widths = [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
    ];
    let mut backbone = Vec::new();
    let mut input = 3;
    for (l, w) in layers.iter().zip(widths) {
        backbone.push((format!("features.{l}.weight"), vec![w, input, 3, 3]));
        backbone.push((format!("features.{l}.bias"), vec![w]));
        input = w;
    }
    write("vgg16.safetensors", backbone);
    let heads = [64, 128, 256, 512, 512]
        .iter()
        .enumerate()
        .map(|(k, &c)| (format!("lin{k}.model.1.weight"), vec![1, c, 1, 1]))
        .collect();
    write("vgg.safetensors", heads);
}

fn file_bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn sd_recipe_latent_2rf_with_frozen_text_encoder_and_vae_then_l2_and_lpips_distillation() {
    let dir = temp_dir("sd-recipe");
    let sd = dir.join("sd");
    tiny_sd(&sd);
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red heart\n\na blue car\n").unwrap();
    let reflow = |model: &Path, out: &Path, solver: &str, pairs: &str| {
        ok(instaflow()
            .args([
                "reflow",
                "--pairs",
                pairs,
                "--solver",
                solver,
                "--guidance",
                "1.5",
            ])
            .arg("--model")
            .arg(model)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap())
    };
    let stdout = reflow(&sd, &dir.join("pairs"), "dpm:3", "4");
    assert!(stdout.contains("holds 4/4 pairs"), "{stdout}");
    // 2-RF from the ε-prediction teacher's weights, in its latent space.
    let run = dir.join("2rf");
    let fit = |stage: &str, pairs: &Path, init: &Path, out: &Path, extra: &[&str]| {
        let mut cmd = instaflow();
        let steps: &[&str] = if extra.contains(&"--steps") {
            &[]
        } else {
            &["--steps", "3"]
        };
        let lr: &[&str] = if extra.contains(&"--lr") {
            &[]
        } else {
            &["--lr", "1e-3"]
        };
        cmd.args([stage, "--batch", "2", "--warmup", "1"])
            .args(steps)
            .args(lr)
            .args(["--checkpoint-every", "3"])
            .arg("--pairs")
            .arg(pairs)
            .arg("--init")
            .arg(init)
            .arg("--out")
            .arg(out)
            .args(extra);
        cmd.output().unwrap()
    };
    ok(fit("train", &dir.join("pairs"), &sd, &run, &[]));
    let model = run.join("model");
    for frozen in [
        "text_encoder/model.safetensors",
        "text_encoder/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    ] {
        assert_eq!(
            file_bytes(model.join(frozen)),
            file_bytes(sd.join(frozen)),
            "{frozen} changed"
        );
    }
    let unet = "unet/diffusion_pytorch_model.safetensors";
    assert_ne!(
        file_bytes(model.join(unet)),
        file_bytes(sd.join(unet)),
        "the UNet trained"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&file_bytes(model.join("model_index.json"))).unwrap();
    assert_eq!(index["vae"][1], "AutoencoderKL");
    assert_eq!(index["scheduler"][0], "diffusers");
    assert!(model.join("scheduler/scheduler_config.json").is_file());
    // The exported folder is a complete pipeline: it generates.
    let png = dir.join("2rf.png");
    ok(instaflow()
        .args(["generate", "a red heart", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap());
    assert!(png.is_file());
    // --train-text-encoder opts in.
    let both = dir.join("2rf-text");
    ok(fit(
        "train",
        &dir.join("pairs"),
        &sd,
        &both,
        &["--train-text-encoder", "--steps", "2"],
    ));
    let te = "text_encoder/model.safetensors";
    assert_ne!(
        file_bytes(both.join("model").join(te)),
        file_bytes(sd.join(te))
    );
    // Stage 1: L2 distillation on the 2-RF's pairs (one pair: a fixed batch).
    reflow(&model, &dir.join("pairs2"), "euler:2", "1");
    let stage1 = dir.join("stage1");
    ok(fit(
        "distill",
        &dir.join("pairs2"),
        &model,
        &stage1,
        &["--loss", "l2"],
    ));
    // Stage 2: LPIPS through the frozen decoder continues the student.
    fails(
        fit(
            "distill",
            &dir.join("pairs2"),
            &stage1.join("model"),
            &dir.join("s2"),
            &["--loss", "lpips"],
        ),
        "--loss lpips needs LPIPS weights",
    );
    let lpips = dir.join("lpips");
    random_lpips(&lpips);
    // The same weights as a Hub id, from the hub's cache (offline): the plan reads them; a
    // repository without the linear heads is refused naming them.
    let cache = dir.join("hub");
    for (repo, files) in [
        ("lpips", &["vgg16.safetensors", "vgg.safetensors"][..]),
        ("vgg-only", &["vgg16.safetensors"][..]),
    ] {
        let repo_dir = cache.join(format!("models--org--{repo}"));
        let snapshot = repo_dir.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "0123abcd").unwrap();
        for f in files {
            std::fs::copy(lpips.join(f), snapshot.join(f)).unwrap();
        }
    }
    let from_hub = |repo: &str| {
        instaflow()
            .args([
                "distill", "--loss", "lpips", "--plan", "--lpips", repo, "--pairs",
            ])
            .arg(dir.join("pairs2"))
            .arg("--init")
            .arg(stage1.join("model"))
            .arg("--out")
            .arg(dir.join("s2-hub"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let plan = ok(from_hub("hf:org/lpips"));
    assert!(plan.contains("memory plan"), "{plan}");
    fails(from_hub("hf:org/vgg-only"), "linear-head");
    let stage2 = dir.join("stage2");
    let lp = lpips.to_str().unwrap();
    ok(fit(
        "distill",
        &dir.join("pairs2"),
        &stage1.join("model"),
        &stage2,
        &[
            "--loss",
            "lpips",
            "--lpips",
            lp,
            "--loss-size",
            "32",
            "--steps",
            "6",
            "--lr",
            "1e-4",
        ],
    ));
    let l = losses(&stage2);
    assert!(l[5] < l[0], "LPIPS loss on a fixed batch: {l:?}");
    assert_eq!(
        file_bytes(stage2.join("model/vae/diffusion_pytorch_model.safetensors")),
        file_bytes(sd.join("vae/diffusion_pytorch_model.safetensors"))
    );
    ok(fit(
        "distill",
        &dir.join("pairs2"),
        &stage1.join("model"),
        &dir.join("stage2-huber"),
        &["--loss", "lpips-huber", "--lpips", lp, "--steps", "2"],
    ));
    // Pixel pairs with a latent --init, and latent pairs with a pixel --init, are refused.
    let pixel_run = dir.join("pixel");
    ok(train(&pixel_run, &["--steps", "1"]));
    fails(
        fit(
            "train",
            &dir.join("pairs"),
            &pixel_run.join("model"),
            &dir.join("x"),
            &[],
        ),
        "pixel-space model",
    );
    ok(instaflow()
        .args(["reflow", "--pairs", "2", "--solver", "euler:1", "--model"])
        .arg(pixel_run.join("model"))
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(dir.join("pixel-pairs"))
        .output()
        .unwrap());
    fails(
        fit("train", &dir.join("pixel-pairs"), &sd, &dir.join("y"), &[]),
        "latent-space model",
    );
    fails(
        fit(
            "train",
            &dir.join("pairs"),
            &sd,
            &dir.join("z"),
            &["--loss", "lpips"],
        ),
        "--loss is a distillation setting",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reflow_from_an_epsilon_sd_teacher_with_ddim_or_dpm_solver_and_a_jsonl_prompt_set() {
    let dir = temp_dir("ddim");
    tiny_sd(&dir.join("sd"));
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a red heart\"}\n{\"prompt\": \"a blue car\"}\n",
    )
    .unwrap();
    let pairs = dir.join("pairs");
    let stdout = ok(instaflow()
        .args([
            "reflow",
            "--pairs",
            "3",
            "--solver",
            "ddim:2",
            "--guidance",
            "1.5",
        ])
        .arg("--model")
        .arg(dir.join("sd"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&pairs)
        .output()
        .unwrap());
    assert!(stdout.contains("holds 3/3 pairs"), "{stdout}");
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pairs.join("pairs.json")).unwrap()).unwrap();
    assert_eq!(plan["prompts"][1], "a blue car");
    // The paper's teacher solver: DPM-Solver++ (2M).
    let stdout = ok(instaflow()
        .args(["reflow", "--pairs", "3", "--solver", "dpm:3"])
        .arg("--model")
        .arg(dir.join("sd"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(dir.join("pairs-dpm"))
        .output()
        .unwrap());
    assert!(stdout.contains("holds 3/3 pairs"), "{stdout}");
    fails(
        instaflow()
            .args(["reflow", "--solver", "dpm:0"])
            .arg("--model")
            .arg(dir.join("sd"))
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(&pairs)
            .output()
            .unwrap(),
        "dpm needs a positive step count",
    );
    fails(
        instaflow()
            .args(["reflow", "--solver", "ddim:x"])
            .arg("--model")
            .arg(dir.join("sd"))
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(&pairs)
            .output()
            .unwrap(),
        "ddim needs a positive step count",
    );
    std::fs::write(&prompts, "{\"text\": 1}\n").unwrap();
    fails(
        instaflow()
            .args(["reflow"])
            .arg("--model")
            .arg(dir.join("sd"))
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(dir.join("p2"))
            .output()
            .unwrap(),
        "no string field \"prompt\"",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every tensor of an exported UNet, by name.
fn unet_tensors(run: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(run.join("model/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("losses.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn mixed_precision_training_follows_f32_and_resumes_with_its_loss_scale() {
    let dir = temp_dir("mixed-precision");
    let steps = ["--steps", "10", "--lr", "3e-3", "--warmup", "2"];
    let reference = dir.join("f32");
    ok(train(&reference, &steps));
    let reference = losses(&reference);
    let tail = |l: &[f64]| l[7..].iter().sum::<f64>() / 3.0;
    for precision in ["f16", "bf16"] {
        let run = dir.join(precision);
        ok(train(
            &run,
            &[&steps[..], &["--precision", precision]].concat(),
        ));
        let l = losses(&run);
        assert_eq!(l.len(), 10);
        assert!(l.iter().all(|x| x.is_finite()), "{precision}: {l:?}");
        // The same descent within half-precision rounding (and, in f16, a first step skipped
        // while the loss scale settles).
        let (a, b) = (tail(&reference), tail(&l));
        assert!(
            (a - b).abs() <= 0.05 * a,
            "{precision}: mean of the last 3 losses {b}, {a} in f32"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("train.json")).unwrap()).unwrap();
        assert_eq!(summary["precision"], precision, "{summary}");
        let overflowed = summary["overflowed_steps"].as_array().unwrap().len();
        match precision {
            "f16" => {
                assert!(overflowed <= 2, "{summary}");
                // Halved once per overflow, from 2^16.
                let scale = summary["loss_scale"].as_f64().unwrap();
                assert_eq!(scale * 2f64.powi(overflowed as i32), 65536.0, "{summary}");
            }
            _ => assert_eq!(
                (overflowed, &summary["loss_scale"]),
                (0, &serde_json::Value::Null)
            ),
        }
    }
    // Interrupted after 5 steps and resumed: the loss scale comes back with the checkpoint, so
    // the steps are the uninterrupted run's.
    let split = dir.join("f16-split");
    ok(train(
        &split,
        &[
            "--steps",
            "5",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
            "--precision",
            "f16",
        ],
    ));
    ok(train(
        &split,
        &["--resume", "--steps", "10", "--precision", "f16"],
    ));
    assert_eq!(losses(&split), losses(&dir.join("f16")));

    // A backend without half-precision arithmetic says so before training.
    let out = Command::new(env!("CARGO_BIN_EXE_instaflow"))
        .args([
            "--backend",
            "ndarray",
            "train",
            "--size",
            "tiny",
            "--steps",
            "1",
        ])
        .args(["--precision", "bf16", "--data"])
        .arg(data())
        .arg("--out")
        .arg(dir.join("ndarray"))
        .output()
        .unwrap();
    fails(out, "--precision bf16: the ");
    assert!(!dir.join("ndarray/checkpoint").exists());
}

#[test]
fn data_parallel_training_takes_the_steps_of_one_device_and_resumes_on_any_count() {
    let dir = temp_dir("data-parallel");
    let (one, two) = (dir.join("one"), dir.join("two"));
    let steps = ["--steps", "10", "--lr", "3e-3", "--warmup", "2"];
    ok(train(&one, &steps));
    // Two workers for 5 steps, then resumed on four: the same 10 steps as one device.
    ok(train(
        &two,
        &[
            "--devices",
            "cpu:2",
            "--steps",
            "5",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
        ],
    ));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(two.join("train.json")).unwrap()).unwrap();
    let workers = summary["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{summary}");
    for w in workers {
        assert_eq!(w["steps"], 5, "{summary}");
        assert!(w["all_reduce_seconds"].as_f64().unwrap() > 0.0, "{summary}");
    }
    ok(train(
        &two,
        &["--devices", "cpu:4", "--resume", "--steps", "10"],
    ));

    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 10);
    assert_eq!(a.len(), b.len());
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {s}: loss {x} on one device, {y} on several"
        );
    }
    let (a, b) = (unet_tensors(&one), unet_tensors(&two));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let d = common::max_abs_diff(x, y);
        assert!(d <= 1e-5, "{name}: {d} apart after 10 steps");
    }

    // Bad device lists and batches fail before training, naming the problem.
    let bad = dir.join("bad");
    fails(
        train(&bad, &["--devices", "tpu:0"]),
        "unknown device kind `tpu`",
    );
    fails(
        train(&bad, &["--devices", "cpu:3"]),
        "--batch 8 does not split evenly over 3 workers",
    );
    fails(
        train(&bad, &["--devices", "wgpu:0"]),
        "--backend cpu and --devices wgpu:0 disagree",
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_instaflow"));
    cmd.args(["train", "--devices", "wgpu:99", "--data"])
        .arg(data())
        .arg("--out")
        .arg(&bad);
    fails(cmd.output().unwrap(), "there is no wgpu adapter 99");
    assert!(!bad.join("checkpoint").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A port nothing listens on now (the OS's pick; free again once the listener is dropped).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `train` as machine `rank` of two on this machine's loopback.
fn node(out: &Path, rank: u32, ports: [u16; 3], extra: &[&str]) -> Command {
    let mut cmd = train_command(out, extra);
    cmd.args(["--nodes", "2", "--node-rank", &rank.to_string()])
        .args(["--coordinator", &format!("127.0.0.1:{}", ports[0])])
        .args([
            "--node-address",
            &format!("127.0.0.1:{}", ports[1 + (rank as usize).min(1)]),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

#[test]
fn two_machines_on_loopback_take_the_steps_of_one_and_stop_when_one_dies() {
    let dir = temp_dir("nodes");
    let one = dir.join("one");
    ok(train(&one, &["--steps", "6"]));
    let ports = [free_port(), free_port(), free_port()];
    let timeout = ["--peer-timeout", "60", "--steps", "6"];
    let first = node(&dir.join("n0"), 0, ports, &timeout).spawn().unwrap();
    let second = node(&dir.join("n1"), 1, ports, &timeout).spawn().unwrap();
    let (a, b) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    ok(a);
    assert!(ok(b).contains("machine 1 took part in 6 steps"));
    // Machine 0 alone writes; its model equals the one-machine run's.
    assert!(!dir.join("n1/checkpoint").exists());
    let (x, y) = (losses(&one), losses(&dir.join("n0")));
    assert_eq!(x.len(), y.len());
    for (s, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!((p - q).abs() <= 1e-5 * p.abs(), "step {s}: {p} vs {q}");
    }
    for ((name, p), (_, q)) in unet_tensors(&one)
        .iter()
        .zip(&unet_tensors(&dir.join("n0")))
    {
        let d = common::max_abs_diff(p, q);
        assert!(d <= 1e-5, "{name}: {d} apart");
    }

    // Machine 1 killed mid-run: machine 0 stops with an error, its last checkpoint intact.
    let run = dir.join("killed");
    let ports = [free_port(), free_port(), free_port()];
    let long = ["--peer-timeout", "5", "--steps", "100000"];
    let first = node(&run, 0, ports, &long).spawn().unwrap();
    let mut second = node(&dir.join("killed-1"), 1, ports, &long)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !run.join("checkpoint/state.json").is_file() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    second.kill().unwrap();
    second.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let out = first.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        killed_at.elapsed().as_secs() < 60,
        "took {:?}",
        killed_at.elapsed()
    );
    assert!(
        err.contains("no step finished") || err.contains("connection to another machine"),
        "{err}"
    );
    assert!(err.contains("the last checkpoint is kept"), "{err}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoint/state.json")).unwrap()).unwrap();
    assert!(state["step"].as_u64().unwrap() >= 3, "{state}");

    // Nobody at the coordinator's address: a clear error after --peer-timeout, not a hang.
    let ports = [free_port(), free_port(), free_port()];
    let mut lone = node(&dir.join("lone"), 1, ports, &["--peer-timeout", "2"]);
    let start = std::time::Instant::now();
    let out = lone.output().unwrap();
    assert!(start.elapsed().as_secs() < 30);
    fails(out, "not every machine joined");
    // Ranks and addresses are checked before anything starts.
    fails(
        node(&dir.join("bad"), 2, ports, &[]).output().unwrap(),
        "--node-rank 2 is out of range",
    );
    let cmd = &mut train_command(&dir.join("bad"), &["--nodes", "2"]);
    fails(cmd.output().unwrap(), "needs --coordinator HOST:PORT");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shapes_data_and_eval_on_a_prompt_list_report_each_attribute() {
    let dir = temp_dir("shapes");
    let data = dir.join("shapes");
    let stdout = ok(instaflow()
        .args(["data", "shapes", "--size", "8", "--per-class", "3", "--out"])
        .arg(&data)
        .output()
        .unwrap());
    assert!(stdout.contains("192 images 3×8×8, 64 classes"), "{stdout}");
    let prompts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("prompts.json")).unwrap()).unwrap();
    assert_eq!(prompts.as_array().unwrap().len(), 48);
    assert_eq!(prompts[0]["prompt"], "a red circle");
    for (args, needle) in [
        (["--size", "4", "--per-class", "1"], "image size 4"),
        (["--size", "8", "--per-class", "0"], "--per-class 0"),
    ] {
        fails(
            instaflow()
                .args(["data", "shapes"])
                .args(args)
                .arg("--out")
                .arg(dir.join("bad"))
                .output()
                .unwrap(),
            needle,
        );
    }

    let run = dir.join("run");
    ok(instaflow()
        .args(["train", "--size", "tiny", "--batch", "8", "--steps", "3"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap());
    let eval = |prompts: &Path, out: &Path| {
        instaflow()
            .args([
                "eval",
                "--seeds",
                "2",
                "--first",
                "6",
                "--classifier-epochs",
                "1",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--student")
            .arg(format!("tiny={}", run.join("model").display()))
            .arg("--prompts")
            .arg(prompts)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.join("eval");
    let stdout = ok(eval(&data.join("prompts.json"), &out));
    assert!(
        stdout.contains("| prompt accuracy ↑ | colour accuracy ↑ | shape accuracy ↑ |"),
        "{stdout}"
    );
    for row in ["| a red circle |", "| a purple diamond |"] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    assert!(
        !stdout.contains("| a pink cross |"),
        "--first 6 kept more:\n{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["attributes"], serde_json::json!(["colour", "shape"]));
    let entries = json["prompts"][0]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 6);
    // 2 seeds each: every accuracy is 0, ½ or 1.
    for e in entries {
        for a in std::iter::once(&e["accuracy"]).chain(e["attributes"].as_array().unwrap()) {
            assert!([0.0, 0.5, 1.0].contains(&a.as_f64().unwrap()), "{e}");
        }
    }
    let row = &json["rows"][0];
    assert!(row["attributes"]["colour"].as_f64().unwrap() >= row["accuracy"].as_f64().unwrap());
    assert_eq!(
        &std::fs::read(out.join("prompts-grid-1.png")).unwrap()[..4],
        b"\x89PNG"
    );

    // A prompt whose class the data set does not have is named.
    let wrong = dir.join("wrong.json");
    std::fs::write(
        &wrong,
        r#"[{"prompt": "a red apple", "class": "red apple"}]"#,
    )
    .unwrap();
    fails(eval(&wrong, &dir.join("eval2")), "\"red apple\"");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The toy experiment is a pure function of its seed. It runs here rather than beside the code:
/// the CPU backend's random source is one per process, and the library's unit tests draw from
/// it on other threads at the same time.
#[test]
fn toy_experiment_same_seed_same_report() {
    use burn::backend::{Autodiff, Flex};
    use instaflow::toy::{ToyConfig, run};
    let cfg = ToyConfig {
        rf_steps: 40,
        reflow_steps: 20,
        distill_steps: 20,
        pairs: 128,
        eval_samples: 64,
        straightness_steps: 10,
        trajectories: 4,
        ..ToyConfig::reduced()
    };
    let a = run::<Autodiff<Flex>>(&cfg, &Default::default(), &mut |_| {});
    let b = run::<Autodiff<Flex>>(&cfg, &Default::default(), &mut |_| {});
    assert_eq!(a, b);
}
