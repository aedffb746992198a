//! `instaflow eval`: compare models on one data set — Fréchet distance on the features of a small
//! classifier, prompt accuracy, straightness, transport cost and RK45 NFE — for Euler N steps, with
//! the same noise and prompts for every model. Writes eval.md, eval.json and grid.png.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use instaflow::flow::metrics::{frechet_distance, path_stats};
use instaflow::flow::solvers::{Rk45Options, Solver};
use instaflow::flow::velocity::Guided;
use instaflow::sd::pipeline::{GenerateOptions, InstaFlowPipeline, to_rgb8};
use instaflow::sd::source::ModelSource;
use instaflow::training::classifier::{self, Classifier};
use instaflow::training::data::ImageTextDataset;
use rand::Rng;

use crate::backend::{BackendChoice, resolve};
use crate::{plots, with_backend};

/// Options of `instaflow eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The data set the models were trained on (from `instaflow data`).
    #[arg(long)]
    data: PathBuf,
    /// A flow model to evaluate at every --steps, as NAME=FOLDER (repeatable).
    #[arg(long = "model", value_name = "NAME=FOLDER")]
    models: Vec<String>,
    /// A one-step student (evaluated at N = 1 only), as NAME=FOLDER (repeatable).
    #[arg(long = "student", value_name = "NAME=FOLDER")]
    students: Vec<String>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Euler step counts for flow models.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,25")]
    steps: Vec<usize>,
    /// Generated samples per model and N (prompts cycle through the classes).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Samples used for straightness, transport cost and RK45 NFE.
    #[arg(long, default_value_t = 128)]
    path_samples: usize,
    /// A classifier from an earlier eval (OUT/classifier.safetensors); trained on --data if absent.
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Epochs of classifier training (when no --classifier is given).
    #[arg(long, default_value_t = 5)]
    classifier_epochs: usize,
    /// Learning rate of classifier training.
    #[arg(long, default_value_t = 3e-3)]
    classifier_lr: f64,
    /// Guidance α.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Seed of the noise and prompts.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Samples per batch.
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// A fixed prompt list instead of the data's captions: a JSON array of `{"prompt": …,
    /// "class": …}` (a built-in model's `prompts.json`). Every prompt is sampled with --seeds
    /// noises; --samples is ignored. eval.md then has a row per prompt, and prompts-grid-K.png
    /// (every prompt, first 4 seeds) for each model and N.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// With --prompts: noises per prompt.
    #[arg(long, default_value_t = 8)]
    seeds: usize,
    /// With --prompts: the first this many prompts only (0: all).
    #[arg(long, default_value_t = 0)]
    first: usize,
}

/// One entry of a prompt list (`prompts.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PromptEntry {
    /// The text given to the model.
    pub prompt: String,
    /// The class (of the data set) a picture of it belongs to.
    pub class: String,
}

/// Read a prompt list and check its classes against the data's.
fn read_prompts(path: &std::path::Path, data: &ImageTextDataset) -> Result<Vec<PromptEntry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let list: Vec<PromptEntry> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of {{\"prompt\", \"class\"}}",
            path.display()
        )
    })?;
    ensure!(!list.is_empty(), "{}: no prompts", path.display());
    if let Some(bad) = list.iter().find(|e| !data.classes.contains(&e.class)) {
        bail!(
            "{}: prompt {:?} has class {:?}, which the data set does not have",
            path.display(),
            bad.prompt,
            bad.class
        );
    }
    Ok(list)
}

/// Share of `predicted` whose class-name word `w` equals `expected`'s, per attribute.
fn attribute_accuracy(
    data: &ImageTextDataset,
    predicted: &[usize],
    expected: &[usize],
) -> Vec<(String, f64)> {
    data.attributes
        .iter()
        .enumerate()
        .map(|(w, name)| {
            let word = |c: usize| data.classes[c].split(' ').nth(w);
            let hits = predicted
                .iter()
                .zip(expected)
                .filter(|&(&p, &e)| word(p) == word(e))
                .count();
            (name.clone(), hits as f64 / predicted.len().max(1) as f64)
        })
        .collect()
}

fn named(spec: &str) -> Result<(String, PathBuf)> {
    let (name, path) = spec
        .split_once('=')
        .with_context(|| format!("{spec}: expected NAME=FOLDER"))?;
    let path = PathBuf::from(path);
    ensure!(path.is_dir(), "{spec}: {} is not a folder", path.display());
    Ok((name.to_string(), path))
}

/// Noise, text embeddings and null embeddings of one batch.
type Batch<B> = (Tensor<B, 4>, Tensor<B, 3>, Tensor<B, 3>);

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    model: String,
    steps: usize,
    fd: f64,
    accuracy: f64,
    straightness: Option<f64>,
    transport_cost: Option<f64>,
    rk45_nfe: Option<usize>,
    seconds: f64,
    /// Accuracy per attribute of the data's class names (colour, shape), if it has them.
    attributes: std::collections::BTreeMap<String, f64>,
}

/// One prompt's share of samples in its class, and per attribute.
type PromptScore = (String, f64, Vec<f64>);

/// Labelled images: a grid row, or a prompt and its seeds.
type Labelled = (String, Vec<Vec<u8>>);

/// Run `instaflow eval`.
pub fn run(choice: BackendChoice, args: EvalArgs) -> Result<()> {
    ensure!(
        !args.models.is_empty() || !args.students.is_empty(),
        "give at least one --model or --student"
    );
    ensure!(
        args.samples >= 20 && args.batch > 0,
        "--samples must be at least 20, --batch positive"
    );
    ensure!(
        (1..=1000).contains(&args.seeds),
        "--seeds must be between 1 and 1000"
    );
    ensure!(
        args.steps.iter().all(|&n| n > 0),
        "--steps must be positive"
    );
    let data = ImageTextDataset::load(&args.data)?;
    ensure!(
        !data.classes.is_empty(),
        "{}: eval needs a labelled data set",
        args.data.display()
    );
    let selected = resolve(choice)?;
    crate::note!("backend: {}", selected.name());
    with_backend!(autodiff &selected, B, device => evaluate::<B>(&args, &data, &device, selected.name()))
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let b = crate::progress_bar(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:32}} {{pos}}/{{len}} {what} {{msg}}"
        ))
        .expect("valid template"),
    );
    b
}

fn features<B: Backend>(clf: &Classifier<B>, x: Tensor<B, 4>) -> (Vec<f32>, Vec<usize>) {
    let f = clf
        .features(x.clone())
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32");
    (f, clf.predict(x))
}

fn evaluate<B: AutodiffBackend>(
    args: &EvalArgs,
    data: &ImageTextDataset,
    device: &B::Device,
    backend: &str,
) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let idev = device;
    // 1. The feature network.
    let (clf_cfg, clf, clf_acc) = match &args.classifier {
        Some(p) => {
            let (cfg, m) = classifier::load::<I<B>>(p, idev).map_err(anyhow::Error::msg)?;
            let (test, _) = data.split_every(10, 0);
            let acc = classifier::accuracy(&m, &test, idev);
            (cfg, m, acc)
        }
        None => {
            let (test, train) = data.split_every(10, 0);
            let b = bar(0, "classifier steps");
            let (cfg, m, acc) = classifier::train::<B>(
                &train,
                &test,
                args.classifier_epochs,
                args.classifier_lr,
                args.seed,
                device,
                |s, n, l| {
                    b.set_length(n as u64);
                    b.set_position(s as u64);
                    b.set_message(format!("loss {l:.3}"));
                },
            );
            b.finish_and_clear();
            let path = args.out.join("classifier.safetensors");
            m.save(&cfg, &path).map_err(anyhow::Error::msg)?;
            (cfg, m, acc)
        }
    };
    ensure!(
        [clf_cfg.channels, clf_cfg.size] == [data.channels, data.height],
        "the classifier was trained on other images than --data"
    );
    crate::note!("classifier: {:.1}% on held-out data", 100.0 * clf_acc);

    // 2. Real features, prompts, noise — shared by every model.
    let mut rng = instaflow::flow::noise::rng(args.seed);
    let n = args.samples;
    let k = data.classes.len();
    let by_class: Vec<Vec<usize>> = (0..k)
        .map(|c| {
            (0..data.len())
                .filter(|&i| data.items[i].label == Some(c))
                .collect()
        })
        .collect();
    // Classes in turn, skipping those without items.
    let present: Vec<usize> = (0..k).filter(|&c| !by_class[c].is_empty()).collect();
    ensure!(
        !present.is_empty(),
        "--data {}: it names {k} classes but no item has a class label",
        args.data.display()
    );
    let mut labels = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let list = match &args.prompts {
        Some(path) => {
            let mut list = read_prompts(path, data)?;
            if args.first > 0 {
                list.truncate(args.first);
            }
            Some(list)
        }
        None => None,
    };
    let n = match &list {
        // Prompt-major: the seeds of one prompt are consecutive samples.
        Some(list) => {
            for e in list {
                let c = data.classes.iter().position(|c| *c == e.class);
                for _ in 0..args.seeds {
                    labels.push(c.expect("checked by read_prompts"));
                    prompts.push(e.prompt.clone());
                }
            }
            prompts.len()
        }
        None => {
            for i in 0..n {
                let c = present[i % present.len()];
                let item = by_class[c][rng.random_range(0..by_class[c].len())];
                labels.push(c);
                prompts.push(data.caption(item, &mut rng).to_string());
            }
            n
        }
    };
    let real_idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..data.len())).collect();
    let real_idx2: Vec<usize> = (0..n).map(|_| rng.random_range(0..data.len())).collect();
    let mut real = Vec::new();
    let mut real2 = Vec::new();
    for (a, b) in real_idx
        .chunks(args.batch)
        .zip(real_idx2.chunks(args.batch))
    {
        real.extend(features(&clf, data.pixels::<I<B>>(a, idev)).0);
        real2.extend(features(&clf, data.pixels::<I<B>>(b, idev)).0);
    }
    let dim = clf_cfg.features;
    let floor = frechet_distance(&real, &real2, dim);
    let shape = [data.channels, data.height, data.width];
    let noise =
        instaflow::flow::noise::standard_normal(&mut rng, n * shape.iter().product::<usize>());

    // 3. Every model × N.
    let mut jobs: Vec<(String, PathBuf, Vec<usize>, bool)> = Vec::new();
    for m in &args.models {
        let (name, path) = named(m)?;
        jobs.push((name, path, args.steps.clone(), true));
    }
    for m in &args.students {
        let (name, path) = named(m)?;
        jobs.push((name, path, vec![1], false));
    }
    let mut rows = Vec::new();
    let mut grid: Vec<Labelled> = Vec::new();
    // With a prompt list: per model and N, every prompt's accuracy and its first 4 images.
    let mut per_prompt: Vec<(String, Vec<PromptScore>)> = Vec::new();
    let mut prompt_grids: Vec<(String, Vec<Labelled>)> = Vec::new();
    let per = shape.iter().product::<usize>();
    for (name, path, steps, is_flow) in jobs {
        let pipe = InstaFlowPipeline::<I<B>>::load(&ModelSource::dir(&path), idev)
            .with_context(|| format!("loading {}", path.display()))?;
        ensure!(
            pipe.vae.is_none(),
            "{}: eval supports pixel-space models",
            path.display()
        );
        let (h, w) = pipe.unet_config.latent_size();
        ensure!(
            [pipe.unet_config.in_channels, h, w] == shape,
            "{}: makes {:?} images, the data has {shape:?}",
            path.display(),
            [pipe.unet_config.in_channels, h, w]
        );
        let negative_one = pipe.encode_prompts(&[""], idev)?;
        let batch_tensors = |start: usize, end: usize| -> Result<Batch<I<B>>> {
            let ps: Vec<&str> = prompts[start..end].iter().map(String::as_str).collect();
            let z0 = Tensor::from_data(
                TensorData::new(
                    noise[start * per..end * per].to_vec(),
                    [end - start, shape[0], shape[1], shape[2]],
                ),
                idev,
            );
            Ok((
                z0,
                pipe.encode_prompts(&ps, idev)?,
                negative_one.clone().repeat_dim(0, end - start),
            ))
        };
        // Path statistics of the flow (straightness needs many small steps; NFE from RK45).
        let (paths, nfe) = if is_flow {
            let m = args.path_samples.min(n);
            let (z0, text, neg) = batch_tensors(0, m)?;
            let ode = Guided::with_guidance(&pipe.unet, &text, &neg, args.guidance);
            let stats = path_stats(&ode, z0.clone(), 100);
            let rk = Solver::Rk45(Rk45Options {
                rtol: 1e-3,
                atol: 1e-3,
                max_steps: 1000,
            });
            let sol = pipe.solve(z0, &text, &neg, args.guidance, rk);
            (Some(stats), Some(sol.nfe))
        } else {
            (None, None)
        };
        for &steps in &steps {
            let label = if is_flow {
                format!("{name} (N={steps})")
            } else {
                format!("{name} (N=1)")
            };
            let b = bar(n, &label);
            let t = Instant::now();
            let mut fake = Vec::new();
            let mut predicted = Vec::with_capacity(n);
            let mut images = Vec::new();
            let mut first_row = Vec::new();
            for start in (0..n).step_by(args.batch) {
                let end = (start + args.batch).min(n);
                let (z0, text, neg) = batch_tensors(start, end)?;
                let x = pipe.sample(
                    z0,
                    &text,
                    &neg,
                    GenerateOptions {
                        steps,
                        guidance: args.guidance,
                    },
                );
                let x = x.clamp(-1.0, 1.0);
                if list.is_some() {
                    images.extend(to_rgb8(pipe.decode(x.clone())));
                } else if start == 0 {
                    first_row = to_rgb8(pipe.decode(x.clone().narrow(0, 0, k.min(end))));
                }
                let (f, pred) = features(&clf, x);
                predicted.extend(pred);
                fake.extend(f);
                b.set_position(end as u64);
            }
            b.finish_and_clear();
            let correct = predicted
                .iter()
                .zip(&labels)
                .filter(|(p, l)| p == l)
                .count();
            if let Some(list) = &list {
                let s = args.seeds;
                let mut entries = Vec::new();
                let mut cells = Vec::new();
                for (i, e) in list.iter().enumerate() {
                    let (p, l) = (&predicted[i * s..(i + 1) * s], &labels[i * s..(i + 1) * s]);
                    let hits = p.iter().zip(l).filter(|(a, b)| a == b).count();
                    let attrs = attribute_accuracy(data, p, l).into_iter().map(|a| a.1);
                    entries.push((e.prompt.clone(), hits as f64 / s as f64, attrs.collect()));
                    cells.push((e.prompt.clone(), images[i * s..i * s + s.min(4)].to_vec()));
                }
                prompt_grids.push((label.clone(), cells));
                per_prompt.push((label.clone(), entries));
                first_row = (0..list.len().min(k))
                    .map(|i| images[i * s].clone())
                    .collect();
            }
            let row = Row {
                model: name.clone(),
                steps,
                fd: frechet_distance(&real, &fake, dim),
                accuracy: correct as f64 / n as f64,
                attributes: attribute_accuracy(data, &predicted, &labels)
                    .into_iter()
                    .collect(),
                straightness: paths.map(|p| p.straightness),
                transport_cost: paths.map(|p| p.transport_cost),
                rk45_nfe: nfe,
                seconds: t.elapsed().as_secs_f64(),
            };
            crate::note!(
                "{label}: FD {:.3}, accuracy {:.1}%",
                row.fd,
                100.0 * row.accuracy
            );
            grid.push((label, first_row));
            rows.push(row);
        }
    }
    if rows.is_empty() {
        bail!("nothing evaluated");
    }

    // 4. Reports.
    let fmt = |v: Option<f64>, d: usize| v.map_or_else(|| "—".to_string(), |x| format!("{x:.d$}"));
    let attr_head: String = data
        .attributes
        .iter()
        .map(|a| format!(" {a} accuracy ↑ |"))
        .collect();
    let attr_rule = "---:|".repeat(data.attributes.len());
    let mut md = format!(
        "| model | N | FD ↓ | prompt accuracy ↑ |{attr_head} straightness ↓ | transport cost | RK45 NFE |\n|---|---:|---:|---:|{attr_rule}---:|---:|---:|\n"
    );
    for r in &rows {
        let attrs: String = data
            .attributes
            .iter()
            .map(|a| format!(" {:.1}% |", 100.0 * r.attributes[a]))
            .collect();
        md += &format!(
            "| {} | {} | {:.3} | {:.1}% |{attrs} {} | {} | {} |\n",
            r.model,
            r.steps,
            r.fd,
            100.0 * r.accuracy,
            fmt(r.straightness, 4),
            fmt(r.transport_cost, 1),
            r.rk45_nfe.map_or("—".into(), |v| v.to_string())
        );
    }
    for (label, entries) in &per_prompt {
        md += &format!(
            "\n**{label}**, {} seeds per prompt:\n\n| prompt | class ↑ |{attr_head}\n|---|---:|{attr_rule}\n",
            args.seeds
        );
        for (prompt, acc, attrs) in entries {
            let attrs: String = attrs
                .iter()
                .map(|a| format!(" {:.0}% |", 100.0 * a))
                .collect();
            md += &format!("| {prompt} | {:.0}% |{attrs}\n", 100.0 * acc);
        }
    }
    md += &format!(
        "\n{n} samples per row, same noise and prompts for every row; FD on the {dim}-d features of a \
         classifier trained on the data ({:.1}% held-out accuracy); FD between two real samples of the \
         same size: {floor:.3}. Backend {backend}.\n",
        100.0 * clf_acc
    );
    std::fs::write(args.out.join("eval.md"), &md)?;
    let json = serde_json::json!({
        "rows": rows, "samples": n, "fd_real_vs_real": floor, "classifier_accuracy": clf_acc,
        "guidance": args.guidance, "seed": args.seed, "backend": backend,
        "attributes": data.attributes,
        "prompts": per_prompt.iter().map(|(label, entries)| serde_json::json!({
            "row": label,
            "seeds": args.seeds,
            "entries": entries.iter().map(|(p, acc, attrs)| serde_json::json!({
                "prompt": p, "accuracy": acc, "attributes": attrs,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        args.out.join("eval.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    plots::image_grid(&grid, (shape[1], shape[2]), 3, &args.out.join("grid.png"))?;
    for (i, (label, cells)) in prompt_grids.iter().enumerate() {
        // One file per model and N: every prompt with its first 4 seeds.
        let file = args.out.join(format!("prompts-grid-{}.png", i + 1));
        plots::prompt_grid(cells, (shape[1], shape[2]), 2, 6, &file)?;
        println!("{label}: {}", file.display());
    }
    println!("{md}");
    println!("grid: {}", args.out.join("grid.png").display());
    Ok(())
}
