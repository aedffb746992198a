//! End-to-end checks of the `instaflow` binary.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{golden, repo};

fn instaflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_instaflow"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("instaflow-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Run `cmd` and fail the test with its stderr unless it succeeds.
fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn toy_prints_the_table_and_writes_figures() {
    let out = temp_dir("toy");
    let result = instaflow()
        .args(["toy", "--backend", "cpu", "--steps-scale", "0.05", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for row in [
        "| 1-RF |",
        "| 2-RF |",
        "| 1-RF+distill |",
        "| 2-RF+distill |",
    ] {
        assert!(stdout.contains(row), "missing {row} in\n{stdout}");
    }
    for f in [
        "trajectories.png",
        "one_step.png",
        "losses.png",
        "report.md",
        "report.json",
    ] {
        let path = out.join(f);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|_| panic!("{} not written", path.display()));
        if f.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
            assert!(bytes.len() > 5_000, "{f} has content");
        }
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_arguments_give_one_clear_error() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["toy", "--steps-scale=-1"],
            "--steps-scale must be a positive number",
        ),
        (
            &["toy", "--guidance", "NaN"],
            "--guidance must be a finite number",
        ),
        (&["toy", "--backend", "tpu"], "invalid value 'tpu'"),
    ];
    for (args, message) in cases {
        let result = instaflow().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    }
}

/// Inputs of `generate` and what the user sees: (arguments, exit code, words of the message).
/// README's "Bad input" table lists the same cases.
const TOO_BIG: [(&[&str], i32, &str); 7] = [
    (
        &["--width", "1000000", "--height", "1000000"],
        3,
        "needs at least",
    ),
    (&["--batch", "100000000"], 3, "the limit is"),
    (&["--max-memory", "1M"], 3, "(--max-memory)"),
    (&["--max-memory", "8X"], 2, "unknown unit `x`"),
    (
        &["--steps", "100000000"],
        1,
        "--steps 100000000: must be between 1 and 10000",
    ),
    (
        &["--width", "1024", "--height", "1024", "--scale", "64"],
        1,
        "at most 16384",
    ),
    (&["--out", "x.jpg"], 1, "the output must be a .png file"),
];

#[test]
fn requests_too_big_for_memory_are_refused_before_allocating() {
    let dir = temp_dir("too-big");
    std::fs::create_dir_all(&dir).unwrap();
    for (args, code, needle) in TOO_BIG {
        let started = std::time::Instant::now();
        let r = instaflow()
            .current_dir(&dir)
            .args(["--backend", "cpu", "generate", "red heart"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // Refused from the configs, before the weights are read.
        assert!(!err.contains("loaded"), "{args:?}: {err}");
        assert!(
            started.elapsed().as_secs() < 20,
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quiet_runs_print_only_results_and_json_is_one_line() {
    let dir = temp_dir("quiet");
    std::fs::create_dir_all(&dir).unwrap();
    let out = run_ok(instaflow().current_dir(&dir).args([
        "--backend",
        "cpu",
        "--quiet",
        "generate",
        "red heart",
        "--json",
        "--repeats",
        "3",
    ]));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["backend"], "cpu (flex)");
    assert_eq!(json["outputs"][0], "instaflow.png");
    assert!(json["timings_ms"]["total"].as_f64().unwrap() > 0.0);
    let warm = &json["timings_ms"]["warm"];
    assert_eq!(warm["runs"], 3, "{warm}");
    assert!(warm["unet"].as_f64().unwrap() > 0.0, "{warm}");
    assert!(
        warm["total"].as_f64().unwrap() >= warm["unet"].as_f64().unwrap(),
        "{warm}"
    );
    assert!(dir.join("instaflow.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unwritable_output_folder_is_an_error_not_a_panic() {
    let file = temp_dir("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let result = instaflow()
        .args(["toy", "--backend", "cpu", "--steps-scale", "0.01", "--out"])
        .arg(file.join("sub"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.starts_with("error: creating"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn help_explains_the_commands() {
    let result = instaflow().arg("--help").output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    for word in ["toy", "bench-backends", "backends", "--backend"] {
        assert!(stdout.contains(word), "--help lacks {word}:\n{stdout}");
    }
    // `generate --help` lists every prompt the built-in model knows.
    let result = instaflow().args(["generate", "--help"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let prompts: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo("models/instaflow-shapes/prompts.json")).unwrap(),
    )
    .unwrap();
    let prompts = prompts.as_array().unwrap();
    assert!(prompts.len() >= 40, "{} prompts", prompts.len());
    assert!(
        stdout.contains(&format!("knows these {} prompts", prompts.len())),
        "{stdout}"
    );
    for p in prompts {
        let p = p["prompt"].as_str().unwrap();
        assert!(stdout.contains(p), "generate --help lacks {p:?}:\n{stdout}");
    }
}

#[test]
fn the_built_in_model_draws_what_its_prompts_name() {
    // Real images of a seed neither the model nor the classifier saw (640, a thirtieth of the
    // evaluation set), the committed classifier (trained by `instaflow eval` on real shapes only)
    // and one-step samples of every published prompt × 8 seeds, with the noise of
    // docs/results.md's evaluation: its recognisability figures.
    let dir = temp_dir("builtin-eval");
    let real = dir.join("real");
    run_ok(
        instaflow()
            .args([
                "data",
                "shapes",
                "--size",
                "32",
                "--per-class",
                "10",
                "--seed",
                "9",
            ])
            .arg("--out")
            .arg(&real),
    );
    let model = repo("models/instaflow-shapes");
    run_ok(
        instaflow()
            .args(["--backend", "cpu", "eval", "--seeds", "8"])
            .arg("--data")
            .arg(&real)
            .arg("--classifier")
            .arg(repo(
                "tests/fixtures/shapes-classifier/classifier.safetensors",
            ))
            .arg("--prompts")
            .arg(model.join("prompts.json"))
            .arg("--student")
            .arg(format!("built-in={}", model.display()))
            .arg("--out")
            .arg(dir.join("eval")),
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval/eval.json")).unwrap()).unwrap();
    let classifier = json["classifier_accuracy"].as_f64().unwrap();
    assert!(
        classifier >= 0.95,
        "classifier held-out accuracy {classifier}"
    );
    let row = &json["rows"][0];
    assert_eq!(row["steps"], 1, "{row}");
    let class = row["accuracy"].as_f64().unwrap();
    let colour = row["attributes"]["colour"].as_f64().unwrap();
    assert!(
        class >= 0.9 && colour >= 0.9,
        "class {class}, colour {colour}: {row}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- instaflow generate ----

/// A complete diffusers folder: a parity fixture plus the CLIP tokenizer.
fn model_dir(name: &str, config: &str) -> PathBuf {
    let dir = temp_dir(name);
    for part in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(dir.join(part)).unwrap();
        for entry in
            std::fs::read_dir(repo("tests/fixtures/parity").join(config).join(part)).unwrap()
        {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(part).join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(
            repo("assets/clip-tokenizer").join(f),
            dir.join("tokenizer").join(f),
        )
        .unwrap();
    }
    dir
}

fn write_tensor(path: &std::path::Path, name: &str, shape: &[usize], values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .unwrap();
    std::fs::write(path, safetensors::serialize([(name, view)], None).unwrap()).unwrap();
}

#[test]
fn generate_meets_the_contract_and_matches_diffusers_latents() {
    let model = model_dir("gen-model", "linear-f16");
    let work = temp_dir("gen-out");
    std::fs::create_dir_all(&work).unwrap();
    let (shape, noise) = golden("linear-f16", "pipeline.noise");
    write_tensor(&work.join("noise.safetensors"), "noise", &shape, &noise);
    for (steps, guidance) in [("1", "1.0"), ("4", "1.5")] {
        let out = work.join(format!("n{steps}.png"));
        let lat = work.join(format!("n{steps}.safetensors"));
        let result = instaflow()
            .args([
                "--backend",
                "cpu",
                "generate",
                "red heart",
                "--steps",
                steps,
                "--guidance",
                guidance,
                "--json",
                "--model",
            ])
            .arg(&model)
            .arg("--noise")
            .arg(work.join("noise.safetensors"))
            .arg("--out")
            .arg(&out)
            .arg("--save-latents")
            .arg(&lat)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{stderr}");
        assert!(
            stderr.contains("UNet step 1/"),
            "progress and stage timings on stderr: {stderr}"
        );
        let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
        assert_eq!(json["steps"].as_u64(), Some(steps.parse().unwrap()));
        assert_eq!(
            json["timings_ms"]["unet_steps"].as_array().unwrap().len(),
            steps.parse::<usize>().unwrap()
        );
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(
            (img.width(), img.height()),
            (32, 32),
            "size from the noise: 8×8 latents × 4"
        );
        let bytes = std::fs::read(&lat).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("latents").unwrap().shape(), &shape[..]);
        let got = read_latents(&lat);
        let (_, want) = golden("linear-f16", &format!("pipeline.n{steps}.latents"));
        let max = common::max_abs_diff(&got, &want);
        assert!(
            max <= 1e-3,
            "N={steps}: latents differ from diffusers by {max}"
        );
    }
    // Seeded batch: indexed file names, default size = sample_size × 8 / 2 (two-level VAE here: ×4).
    let result = instaflow()
        .args([
            "--backend",
            "cpu",
            "generate",
            "café ❤️ über",
            "--batch",
            "2",
            "--seed",
            "7",
            "--model",
        ])
        .arg(&model)
        .arg("--out")
        .arg(work.join("b.png"))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for i in 0..2 {
        assert!(work.join(format!("b-{i}.png")).is_file());
    }
    // A prompt longer than 75 tokens is cut with a warning, not refused.
    let long = "a very long prompt ".repeat(30);
    let result = instaflow()
        .args(["--backend", "cpu", "generate", &long, "--model"])
        .arg(&model)
        .arg("--out")
        .arg(work.join("long.png"))
        .output()
        .unwrap();
    assert!(result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("longer than CLIP's 75 tokens"));
    let _ = std::fs::remove_dir_all(&model);
    let _ = std::fs::remove_dir_all(&work);
}

/// Runs `generate` expecting failure: one `error:` line naming `needle`, no panic, no output file.
fn expect_failure(model: &std::path::Path, extra: &[&str], needle: &str) {
    let out = temp_dir("fail-out").with_extension("png");
    let _ = std::fs::remove_file(&out);
    let mut cmd = instaflow();
    cmd.args(["--backend", "cpu", "generate"]);
    if !extra.contains(&"--prompt-override") {
        cmd.arg("red heart");
    }
    let result = cmd
        .args(extra.iter().filter(|a| **a != "--prompt-override"))
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{extra:?} must fail");
    assert!(
        stderr.contains(needle),
        "{extra:?}: expected {needle:?} in\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{extra:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.trim_start().starts_with("error:") || stderr.contains("\nerror:"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "{extra:?}: nothing may be written to --out on failure"
    );
}

#[test]
fn generate_rejects_bad_input_clearly() {
    let model = model_dir("bad-model", "small-bf16");
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let pristine = std::fs::read(&unet).unwrap();

    expect_failure(&model.join("nope"), &[], "no such folder");
    expect_failure(&model, &["--prompt-override", ""], "the prompt is empty");
    expect_failure(
        &model,
        &["--width", "30"],
        "--width 30: must be a positive multiple of",
    );

    // Noise: wrong shape, NaN, not safetensors.
    let noise = model.join("noise.safetensors");
    write_tensor(&noise, "x", &[1, 3, 8, 8], &vec![0.0; 192]);
    expect_failure(
        &model,
        &["--noise", noise.to_str().unwrap()],
        "expected [B, 4, h, w]",
    );
    let mut values = vec![0.5f32; 256];
    values[17] = f32::NAN;
    write_tensor(&noise, "x", &[1, 4, 8, 8], &values);
    expect_failure(
        &model,
        &["--noise", noise.to_str().unwrap()],
        "value 17 is NaN",
    );
    std::fs::write(&noise, b"not a tensor file").unwrap();
    expect_failure(
        &model,
        &["--noise", noise.to_str().unwrap()],
        "not a valid safetensors file",
    );

    // Weights: missing file, truncated, a tensor missing, a tensor of the wrong shape.
    std::fs::remove_file(&unet).unwrap();
    expect_failure(&model, &[], "no weights in");
    std::fs::write(&unet, &pristine[..pristine.len() / 2]).unwrap();
    expect_failure(&model, &[], "diffusion_pytorch_model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&pristine).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "conv_in.bias")
        .collect();
    std::fs::write(
        &unet,
        safetensors::serialize(tensors.clone(), None).unwrap(),
    )
    .unwrap();
    expect_failure(&model, &[], "conv_in.bias");
    let wrong = vec![0u8; 2 * 7];
    let pos = tensors
        .iter()
        .position(|(n, _)| n == "conv_out.bias")
        .unwrap();
    tensors[pos].1 =
        safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![7], &wrong).unwrap();
    tensors.push(("conv_in.bias".into(), st.tensor("conv_in.bias").unwrap()));
    std::fs::write(&unet, safetensors::serialize(tensors, None).unwrap()).unwrap();
    expect_failure(
        &model,
        &[],
        "conv_out.bias: expected shape [4], file has [7]",
    );
    std::fs::write(&unet, &pristine).unwrap();

    // Config: an unsupported block type.
    let cfg_path = model.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\""),
    )
    .unwrap();
    expect_failure(
        &model,
        &[],
        "unsupported down_block_types = SimpleCrossAttnDownBlock2D",
    );
    std::fs::write(&cfg_path, "{ not json").unwrap();
    expect_failure(&model, &[], "config.json: invalid config");
    std::fs::write(&cfg_path, cfg).unwrap();

    // The repaired folder works again (the failures above were the inputs, not the test).
    let out = model.join("ok.png");
    run_ok(
        instaflow()
            .args(["--backend", "cpu", "generate", "red heart", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn convert_round_trips_the_built_in_model_and_refuses_to_overwrite() {
    let builtin = repo("models/instaflow-shapes");
    let f32_dir = temp_dir("convert-f32");
    let f16_dir = temp_dir("convert-f16");
    for (from, to, dtype) in [(&builtin, &f32_dir, "f32"), (&f32_dir, &f16_dir, "f16")] {
        run_ok(
            instaflow()
                .args(["convert", "--dtype", dtype, "--model"])
                .arg(from)
                .arg("--out")
                .arg(to),
        );
    }
    let size = |d: &PathBuf| {
        std::fs::metadata(d.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&f32_dir) > size(&f16_dir) * 19 / 10,
        "f32 is not about twice f16"
    );
    // f16 → f32 → f16 is exact, so all three folders make the same image.
    let image = |model: &PathBuf, name: &str| {
        let png = f32_dir.parent().unwrap().join(format!(
            "instaflow-test-convert-{name}-{}.png",
            std::process::id()
        ));
        run_ok(
            instaflow()
                .args(["--backend", "cpu", "generate", "red heart", "--scale", "1"])
                .arg("--model")
                .arg(model)
                .arg("--out")
                .arg(&png),
        );
        std::fs::read(&png).unwrap()
    };
    let original = image(&builtin, "orig");
    assert_eq!(image(&f32_dir, "f32"), original);
    assert_eq!(image(&f16_dir, "f16"), original);
    let again = instaflow()
        .args(["convert", "--model"])
        .arg(&builtin)
        .arg("--out")
        .arg(&f16_dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("exists and is not empty"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn hugging_face_ids_are_read_from_the_hub_cache() {
    // The hub cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/…}.
    let cache = temp_dir("hub-cache");
    let snapshot = cache.join("models--someone--tiny-instaflow/snapshots/0123abc");
    run_ok(
        instaflow()
            .args(["random-model", "--preset", "mini", "--seed", "2", "--out"])
            .arg(&snapshot),
    );
    let refs = cache.join("models--someone--tiny-instaflow/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "0123abc").unwrap();
    let out = cache.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let image = |model: &str, png: &str| {
        run_ok(
            instaflow()
                .env("HF_HUB_CACHE", &cache)
                .current_dir(&out)
                .args([
                    "--backend",
                    "cpu",
                    "generate",
                    "a cat",
                    "--model",
                    model,
                    "--out",
                    png,
                ]),
        );
        std::fs::read(out.join(png)).unwrap()
    };
    let a = image("hf:someone/tiny-instaflow", "a.png");
    assert_eq!(a, image("someone/tiny-instaflow", "b.png"));
    assert_eq!(a, image("hf:someone/tiny-instaflow@0123abc", "c.png"));
    let direct = image(snapshot.to_str().unwrap(), "d.png");
    assert_eq!(a, direct);
    for (model, needle) in [
        ("hf:someone/other", "not found in the Hugging Face cache"),
        (
            "hf:someone/tiny-instaflow@v9",
            "revision v9 is not in the Hugging Face cache",
        ),
        ("nobody/nothing", "no such folder, and as a Hugging Face id"),
    ] {
        let r = instaflow()
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(&out)
            .args([
                "--backend",
                "cpu",
                "generate",
                "x",
                "--model",
                model,
                "--out",
                "x.png",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{model}: {err}");
    }
    std::fs::remove_dir_all(&cache).unwrap();
}

/// A local server with the Hugging Face Hub's layout (`/{repo}/resolve/{rev}/{file}`) and the
/// headers downloads rely on (ETag, X-Repo-Commit, Range → 206 + Content-Range); it counts the body
/// bytes it sends and records the paths asked for.
struct HubServer {
    url: String,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HubServer {
    fn start(repo: &'static str, folder: PathBuf) -> Self {
        use std::sync::atomic::Ordering;
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, log) = (bytes.clone(), asked.clone());
        std::thread::spawn(move || {
            let prefix = format!("/{repo}/resolve/main/");
            for request in server.incoming_requests() {
                let path = request.url().to_string();
                log.lock().unwrap().push(path.clone());
                let file = path.strip_prefix(&prefix).map(|f| folder.join(f));
                let Some(Ok(body)) = file.filter(|f| f.is_file()).map(std::fs::read) else {
                    let _ = request.respond(tiny_http::Response::empty(404));
                    continue;
                };
                // A content hash as the ETag, as the Hub gives for LFS files.
                let etag = body.iter().fold(0xcbf29ce484222325u64, |h, &b| {
                    (h ^ b as u64).wrapping_mul(0x100000001b3)
                });
                let range = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .and_then(|h| h.value.as_str().strip_prefix("bytes="))
                    .map(|r| r.to_string());
                let size = body.len();
                let (status, start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                    Some((a, b)) => {
                        let a: usize = a.parse().unwrap();
                        let b = b.parse::<usize>().map_or(size - 1, |b| b.min(size - 1));
                        (206, a, b)
                    }
                    None => (200, 0, size - 1),
                };
                let part = body[start..=end].to_vec();
                count.fetch_add(part.len() as u64, Ordering::SeqCst);
                let header = |k: &str, v: String| tiny_http::Header::from_bytes(k, v).unwrap();
                let response = tiny_http::Response::from_data(part)
                    .with_status_code(status)
                    .with_header(header("ETag", format!("\"{etag:016x}\"")))
                    .with_header(header("X-Repo-Commit", "c0ffee".repeat(6) + "c0ff"))
                    .with_header(header(
                        "Content-Range",
                        format!("bytes {start}-{end}/{size}"),
                    ));
                let _ = request.respond(response);
            }
        });
        Self { url, bytes, asked }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn hugging_face_ids_are_downloaded_into_the_hub_cache() {
    let root = temp_dir("hub-download");
    let origin = root.join("origin");
    run_ok(
        instaflow()
            .args(["random-model", "--preset", "mini", "--seed", "3", "--out"])
            .arg(&origin),
    );
    // Files a real repository has but generation does not read: never fetched.
    std::fs::write(
        origin.join("unet/diffusion_pytorch_model.bin"),
        vec![7u8; 1 << 20],
    )
    .unwrap();
    let hub = HubServer::start("someone/tiny-instaflow", origin.clone());
    let cache = root.join("cache");
    let generate = |model: &str, png: &str, env: &[(&str, &str)]| {
        let mut cmd = instaflow();
        cmd.env("HF_HUB_CACHE", &cache)
            .env("HF_ENDPOINT", &hub.url)
            .env_remove("HF_HUB_OFFLINE")
            .args([
                "--backend",
                "cpu",
                "generate",
                "a cat",
                "--model",
                model,
                "--out",
            ])
            .arg(root.join(png));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // Offline with an empty cache: refused before any request.
    let r = generate(
        "hf:someone/tiny-instaflow",
        "x.png",
        &[("HF_HUB_OFFLINE", "1")],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
    assert_eq!(hub.bytes(), 0);

    let first = generate("hf:someone/tiny-instaflow", "a.png", &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let fetched = hub.bytes();
    let asked = hub.asked.lock().unwrap().clone();
    assert!(fetched > 0);
    assert!(!asked.iter().any(|p| p.ends_with(".bin")), "{asked:?}");
    let snapshot = cache.join(format!(
        "models--someone--tiny-instaflow/snapshots/{}",
        "c0ffee".repeat(6) + "c0ff"
    ));
    assert!(snapshot.join("unet/config.json").is_file());
    run_ok(
        instaflow()
            .args(["--backend", "cpu", "generate", "a cat", "--model"])
            .arg(&origin)
            .arg("--out")
            .arg(root.join("direct.png")),
    );
    let png = |name: &str| std::fs::read(root.join(name)).unwrap();
    assert_eq!(png("a.png"), png("direct.png"));

    // Second run: read from the cache, nothing asked of the server.
    let second = generate("someone/tiny-instaflow", "b.png", &[]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(hub.bytes(), fetched);
    assert_eq!(hub.asked.lock().unwrap().len(), asked.len());
    assert_eq!(png("a.png"), png("b.png"));

    for (model, env, needle) in [
        ("hf:someone/absent", vec![], "has no model_index.json"),
        (
            "hf:someone/tiny-instaflow",
            vec![
                ("HF_HUB_CACHE", "/dev/null/x"),
                ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ],
            "downloading from http://127.0.0.1:9",
        ),
    ] {
        let r = generate(model, "y.png", &env);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{model}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn random_models_refuse_a_non_empty_folder_and_unknown_presets() {
    let dir = temp_dir("random-model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "data").unwrap();
    let r = instaflow()
        .args(["random-model", "--preset", "mini", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not empty"));
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "data"
    );
    let r = instaflow()
        .args(["random-model", "--preset", "sd99", "--out"])
        .arg(dir.join("x"))
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The f32 values of the one tensor in a safetensors file written by `--save-latents`.
fn read_latents(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("latents")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_device_that_cannot_allocate_ends_the_run_with_exit_3() {
    // 8192² pixels: an 805 MB noise buffer, more than a software adapter's largest buffer. burn's
    // GPU server thread panics on the failed allocation; the run must end (not hang) with one
    // message. On a GPU large enough to hold it, the run simply succeeds.
    let dir = temp_dir("device-oom");
    std::fs::create_dir_all(&dir).unwrap();
    let r = instaflow()
        .current_dir(&dir)
        .args(["--backend", "wgpu", "generate", "red heart", "--scale", "1"])
        .args(["--width", "8192", "--height", "8192"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!err.contains("panicked"), "{err}");
    match r.status.code() {
        Some(0) => assert!(dir.join("instaflow.png").is_file()),
        Some(3) => {
            let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(errors.len(), 1, "{err}");
            assert!(errors[0].contains("ran out of memory"), "{err}");
            assert!(!dir.join("instaflow.png").exists());
        }
        code => panic!("exit {code:?}: {err}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f16_on_wgpu_halves_the_weights_and_stays_near_f32() {
    let dir = temp_dir("precision");
    std::fs::create_dir_all(&dir).unwrap();
    // The CPU backends compute in f32 only: one clear error.
    let out = instaflow()
        .args([
            "--backend",
            "cpu",
            "generate",
            "red heart",
            "--precision",
            "f16",
        ])
        .arg("--out")
        .arg(dir.join("cpu.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--precision f16 needs --backend wgpu or cuda"),
        "{stderr}"
    );
    // The built-in model on wgpu (lavapipe in CI: it has f16 shaders), same seed, f32 and f16.
    let mut runs = Vec::new();
    for precision in ["f32", "f16"] {
        let lat = dir.join(format!("{precision}.safetensors"));
        let out = run_ok(
            instaflow()
                .env_remove("XDG_RUNTIME_DIR")
                .env_remove("WAYLAND_DISPLAY")
                .args(["--backend", "wgpu", "generate", "red heart", "--json"])
                .args(["--precision", precision, "--out"])
                .arg(dir.join(format!("{precision}.png")))
                .arg("--save-latents")
                .arg(&lat),
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["precision"], precision);
        // A successful run prints no error line, even where probing Vulkan on a headless machine
        // (no XDG_RUNTIME_DIR) makes libwayland complain.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("error:"), "{stderr}");
        let weights = json["device_memory_bytes"]["weights"].as_f64().unwrap();
        runs.push((weights, read_latents(&lat)));
    }
    let ratio = runs[1].0 / runs[0].0;
    assert!(
        (0.45..=0.55).contains(&ratio),
        "f16 weights should take half the device memory of f32: {} vs {} bytes",
        runs[1].0,
        runs[0].0
    );
    let diff = common::max_abs_diff(&runs[0].1, &runs[1].1);
    // Measured here: 1.8e-2 on latents of magnitude ≤ 1.1 (f16 keeps ~3 significant digits).
    assert!(diff <= 5e-2, "f16 latents differ from f32 by {diff}");
    assert!(
        diff > 0.0,
        "f16 gave bit-identical latents: it did not compute in f16"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in model on native wgpu (burn's fusion and autotuned kernels) against the CPU, same
/// noise. Linear weights loaded as transposed views once gave wrong products there (latents 3.0
/// apart, a visibly wrong image; the browser's unfused WebGPU backend handled the same views); the
/// loader now transposes on the host for every backend but the CPU's.
#[test]
fn wgpu_gives_the_cpus_latents() {
    let dir = temp_dir("wgpu-vs-cpu");
    std::fs::create_dir_all(&dir).unwrap();
    let noise = dir.join("noise.safetensors");
    // Gaussian values: the parity goldens' UNet input, repeated to the built-in model's shape.
    let (_, sample) = golden("conv-f32", "unet.sample");
    let values: Vec<f32> = sample.iter().cycle().take(3 * 32 * 32).copied().collect();
    write_tensor(&noise, "noise", &[1, 3, 32, 32], &values);
    let mut latents = Vec::new();
    for backend in ["cpu", "wgpu"] {
        let lat = dir.join(format!("{backend}.safetensors"));
        run_ok(
            instaflow()
                .env_remove("XDG_RUNTIME_DIR")
                .env_remove("WAYLAND_DISPLAY")
                .args(["--backend", backend, "generate", "red heart", "--noise"])
                .arg(&noise)
                .arg("--out")
                .arg(dir.join(format!("{backend}.png")))
                .arg("--save-latents")
                .arg(&lat),
        );
        latents.push(read_latents(&lat));
    }
    let diff = common::max_abs_diff(&latents[0], &latents[1]);
    assert!(diff <= 1e-3, "wgpu latents differ from the CPU's by {diff}");
    let _ = std::fs::remove_dir_all(&dir);
}
