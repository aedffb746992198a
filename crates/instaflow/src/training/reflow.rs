//! Reflow pair generation: for each pair id `i`, noise `X0` (seeded by `(seed, i)`) and the
//! teacher's ODE solution `X1 = ODE[v_k](X0 | T_i)`, written in shards of safetensors chunks.
//!
//! A folder of pairs holds `pairs.json` (the plan: prompts, count, shape, solver) and, per shard
//! `s` of `n`, the files `shard-s-of-n/chunk-JJJJJ.safetensors` with tensors `ids` (i64),
//! `noise` and `result` (f32 `[k, C, H, W]`). Shard `s` owns the ids `i ≡ s (mod n)`, in chunks of
//! `chunk` ids; chunks are written atomically, so a killed run resumes at the first missing chunk
//! and the finished set has every id exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::flow::noise;
use crate::training::data::{DataError, invalid, write_atomic};

/// Most pairs one folder may hold (the paper's SD pair sets: 3.2 M).
pub const MAX_PAIRS: usize = 100_000_000;

/// Most values one sample may have (`C·H·W`; SD-1.5 latents at 1024²: 65,536).
pub const MAX_SAMPLE_VALUES: usize = 1 << 24;

/// What a pair folder contains; every shard must agree on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairPlan {
    /// The prompt set D_T; pair `i` uses prompt `i mod len`.
    pub prompts: Vec<String>,
    /// Number of pairs.
    pub total: usize,
    /// Noise seed.
    pub seed: u64,
    /// Shape `[C, H, W]` of one sample.
    pub shape: [usize; 3],
    /// Pairs per chunk file.
    pub chunk: usize,
    /// The teacher model (for the record).
    pub teacher: String,
    /// The solver, e.g. "euler:25" or "rk45:1e-3".
    pub solver: String,
    /// Guidance α used by the teacher.
    pub guidance: f64,
}

impl PairPlan {
    /// The prompt of pair `id`.
    pub fn prompt(&self, id: usize) -> &str {
        &self.prompts[id % self.prompts.len()]
    }

    /// The noise `X0` of pair `id` (independent of sharding and batching).
    pub fn noise(&self, id: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(id as u64);
        noise::standard_normal(&mut rng, self.shape.iter().product())
    }

    /// The ids owned by shard `shard` of `of`, in order.
    pub fn shard_ids(&self, shard: usize, of: usize) -> Vec<usize> {
        (shard..self.total).step_by(of).collect()
    }

    /// The chunks (lists of ids) of shard `shard` of `of`.
    pub fn chunks(&self, shard: usize, of: usize) -> Vec<Vec<usize>> {
        self.shard_ids(shard, of)
            .chunks(self.chunk.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Write `pairs.json` into `dir`, or check that the one there is the same plan.
    pub fn create_or_check(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join("pairs.json");
        if path.is_file() {
            let existing = PairPlan::read(dir)?;
            if existing != *self {
                return Err(invalid(
                    &path,
                    "holds pairs made with other settings (prompts, count, seed, shape, chunk, \
                     teacher, solver or guidance); use a new --out folder",
                ));
            }
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|e| invalid(dir, e))?;
        write_atomic(&path, &serde_json::to_vec_pretty(self).expect("json"))
    }

    /// Read `pairs.json` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("pairs.json");
        if !path.is_file() {
            return Err(DataError::Missing(path.display().to_string()));
        }
        let text = std::fs::read(&path).map_err(|e| invalid(&path, e))?;
        let plan: PairPlan = serde_json::from_slice(&text).map_err(|e| invalid(&path, e))?;
        if plan.prompts.is_empty() {
            return Err(invalid(&path, "no prompts"));
        }
        if !(1..=MAX_PAIRS).contains(&plan.total) || plan.chunk == 0 {
            return Err(invalid(
                &path,
                format!(
                    "total = {} and chunk = {}: a pair set holds 1 to {MAX_PAIRS} pairs in chunks                      of at least 1",
                    plan.total, plan.chunk
                ),
            ));
        }
        let values = plan.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if plan.shape.contains(&0) || values.is_none_or(|n| n > MAX_SAMPLE_VALUES) {
            return Err(invalid(
                &path,
                format!(
                    "shape {:?}: each sample needs 1 to {MAX_SAMPLE_VALUES} values",
                    plan.shape
                ),
            ));
        }
        Ok(plan)
    }
}

/// The file of chunk `j` of shard `shard` of `of`.
pub fn chunk_path(dir: &Path, shard: usize, of: usize, j: usize) -> PathBuf {
    dir.join(format!("shard-{shard}-of-{of}"))
        .join(format!("chunk-{j:05}.safetensors"))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write one chunk atomically.
pub fn write_chunk(
    path: &Path,
    plan: &PairPlan,
    ids: &[usize],
    noise: &[f32],
    result: &[f32],
) -> Result<(), DataError> {
    let [c, h, w] = plan.shape;
    let shape = vec![ids.len(), c, h, w];
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let (nb, rb) = (f32_bytes(noise), f32_bytes(result));
    let err = |e: safetensors::SafeTensorError| invalid(path, e);
    let views = [
        (
            "ids",
            TensorView::new(Dtype::I64, vec![ids.len()], &id_bytes).map_err(err)?,
        ),
        (
            "noise",
            TensorView::new(Dtype::F32, shape.clone(), &nb).map_err(err)?,
        ),
        (
            "result",
            TensorView::new(Dtype::F32, shape, &rb).map_err(err)?,
        ),
    ];
    let bytes = safetensors::serialize(views, None).map_err(err)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| invalid(parent, e))?;
    }
    write_atomic(path, &bytes)
}

/// Pairs held in memory for training.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSet {
    /// The plan they were made with.
    pub plan: PairPlan,
    /// Pair ids, sorted.
    pub ids: Vec<usize>,
    /// `X0`, flattened `[n, C, H, W]`.
    pub noise: Vec<f32>,
    /// `X1`, flattened `[n, C, H, W]`.
    pub result: Vec<f32>,
}

/// Ids found in a pair folder, and which are missing or duplicated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairCensus {
    /// Distinct ids present.
    pub present: usize,
    /// Number of the plan's ids with no pair.
    pub missing: usize,
    /// The smallest missing ids (at most [`PairCensus::SHOWN`]); a plan may name 100 M ids, so
    /// the full list is never built.
    pub first_missing: Vec<usize>,
    /// Ids found more than once.
    pub duplicates: Vec<usize>,
    /// Chunk files read.
    pub files: Vec<PathBuf>,
}

impl PairCensus {
    /// How many missing ids a census keeps.
    pub const SHOWN: usize = 5;
}

/// The `n` smallest ids in `0..total` that `seen` (all below `total`) lacks.
fn first_gaps(seen: &BTreeSet<usize>, total: usize, n: usize) -> Vec<usize> {
    let mut gaps = Vec::with_capacity(n);
    let mut next = 0;
    for &id in seen {
        while next < id && gaps.len() < n {
            gaps.push(next);
            next += 1;
        }
        if gaps.len() == n {
            return gaps;
        }
        next = id + 1;
    }
    gaps.extend((next..total).take(n - gaps.len()));
    gaps
}

fn read_f32(
    st: &SafeTensors,
    name: &str,
    path: &Path,
    shape: &[usize],
) -> Result<Vec<f32>, DataError> {
    let t = st
        .tensor(name)
        .map_err(|_| invalid(path, format!("no tensor `{name}`")))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        return Err(invalid(
            path,
            format!(
                "`{name}` is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn chunk_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(dir).map_err(|e| invalid(dir, e))? {
        let shard = shard.map_err(|e| invalid(dir, e))?.path();
        if !shard.is_dir()
            || !shard
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
        {
            continue;
        }
        for f in std::fs::read_dir(&shard).map_err(|e| invalid(&shard, e))? {
            let f = f.map_err(|e| invalid(&shard, e))?.path();
            if f.extension().is_some_and(|e| e == "safetensors") {
                files.push(f);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// One pair read from disk: id, noise, result.
type Row = (usize, Vec<f32>, Vec<f32>);

/// Read every chunk of a pair folder (all shards).
fn read_all(dir: &Path, with_data: bool) -> Result<(PairPlan, PairCensus, Vec<Row>), DataError> {
    let plan = PairPlan::read(dir)?;
    let n: usize = plan.shape.iter().product();
    let mut seen = BTreeSet::new();
    let mut census = PairCensus::default();
    let mut rows = Vec::new();
    for path in chunk_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| invalid(&path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(&path, format!("not safetensors: {e}")))?;
        let ids = st
            .tensor("ids")
            .map_err(|_| invalid(&path, "no tensor `ids`"))?;
        if ids.dtype() != Dtype::I64 || ids.shape().len() != 1 {
            return Err(invalid(&path, "`ids` must be an i64 vector"));
        }
        let ids: Vec<usize> = ids
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .collect();
        let shape = [ids.len(), plan.shape[0], plan.shape[1], plan.shape[2]];
        let (x0, x1) = if with_data {
            (
                read_f32(&st, "noise", &path, &shape)?,
                read_f32(&st, "result", &path, &shape)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        for (k, &id) in ids.iter().enumerate() {
            if id >= plan.total {
                return Err(invalid(
                    &path,
                    format!("pair id {id} is outside the plan's {} pairs", plan.total),
                ));
            }
            if !seen.insert(id) {
                census.duplicates.push(id);
            } else if with_data {
                rows.push((
                    id,
                    x0[k * n..(k + 1) * n].to_vec(),
                    x1[k * n..(k + 1) * n].to_vec(),
                ));
            }
        }
        census.files.push(path);
    }
    census.present = seen.len();
    census.missing = plan.total - census.present;
    census.first_missing = first_gaps(&seen, plan.total, PairCensus::SHOWN);
    Ok((plan, census, rows))
}

/// Which pairs a folder holds (reads only the ids).
pub fn census(dir: &Path) -> Result<PairCensus, DataError> {
    Ok(read_all(dir, false)?.1)
}

impl PairSet {
    /// Load a complete pair folder; an incomplete or inconsistent one is an error that says which
    /// ids are missing or duplicated.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let (plan, census, mut rows) = read_all(dir, true)?;
        if census.missing > 0 || !census.duplicates.is_empty() {
            return Err(invalid(
                dir,
                format!(
                    "incomplete pair set: {} of {} pairs present, {} missing (first {:?}), {} duplicated; \
                     rerun `instaflow reflow` with the same settings to finish it",
                    census.present,
                    plan.total,
                    census.missing,
                    census.first_missing,
                    census.duplicates.len()
                ),
            ));
        }
        rows.sort_by_key(|r| r.0);
        let mut set = PairSet {
            plan,
            ids: Vec::with_capacity(rows.len()),
            noise: Vec::new(),
            result: Vec::new(),
        };
        for (id, x0, x1) in rows {
            set.ids.push(id);
            set.noise.extend(x0);
            set.result.extend(x1);
        }
        Ok(set)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The prompt of row `row`.
    pub fn prompt(&self, row: usize) -> &str {
        self.plan.prompt(self.ids[row])
    }

    /// `(X0, X1)` of rows `rows`, `[B, C, H, W]` each.
    pub fn tensors<B: Backend>(
        &self,
        rows: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let n: usize = self.plan.shape.iter().product();
        let [c, h, w] = self.plan.shape;
        let gather = |v: &[f32]| -> Tensor<B, 4> {
            let data: Vec<f32> = rows
                .iter()
                .flat_map(|&r| v[r * n..(r + 1) * n].iter().copied())
                .collect();
            Tensor::from_data(TensorData::new(data, [rows.len(), c, h, w]), device)
        };
        (gather(&self.noise), gather(&self.result))
    }
}

/// Generate the missing chunks of shard `shard` of `of`: `solve(ids, prompts, noise)` must return
/// the ODE results for one chunk. `progress(done, total)` counts pairs of this shard. Returns the
/// number of pairs generated by this call (0 if the shard was already complete).
pub fn generate_shard(
    plan: &PairPlan,
    dir: &Path,
    shard: usize,
    of: usize,
    mut solve: impl FnMut(&[usize], &[&str], Vec<f32>) -> Result<Vec<f32>, String>,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize, DataError> {
    if of == 0 || shard >= of {
        return Err(invalid(
            dir,
            format!("shard {shard}/{of}: need 0 ≤ shard < count"),
        ));
    }
    plan.create_or_check(dir)?;
    let chunks = plan.chunks(shard, of);
    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut done = 0;
    let mut generated = 0;
    for (j, ids) in chunks.iter().enumerate() {
        let path = chunk_path(dir, shard, of, j);
        if !path.is_file() {
            let prompts: Vec<&str> = ids.iter().map(|&i| plan.prompt(i)).collect();
            let noise: Vec<f32> = ids.iter().flat_map(|&i| plan.noise(i)).collect();
            let result = solve(ids, &prompts, noise.clone()).map_err(|e| invalid(&path, e))?;
            if result.len() != noise.len() {
                return Err(invalid(
                    &path,
                    "the solver returned the wrong number of values",
                ));
            }
            write_chunk(&path, plan, ids, &noise, &result)?;
            generated += ids.len();
        }
        done += ids.len();
        progress(done, total);
    }
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PairPlan {
        PairPlan {
            prompts: vec!["a".into(), "b".into(), "c".into()],
            total: 23,
            seed: 5,
            shape: [1, 2, 2],
            chunk: 4,
            teacher: "test".into(),
            solver: "euler:1".into(),
            guidance: 1.0,
        }
    }

    fn fake_solve(_: &[usize], _: &[&str], noise: Vec<f32>) -> Result<Vec<f32>, String> {
        Ok(noise.iter().map(|x| 2.0 * x).collect())
    }

    #[test]
    fn shards_cover_every_id_once_after_an_interruption() {
        let dir = std::env::temp_dir().join(format!("instaflow-pairs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = plan();
        // Shard 0 of 2 is "killed" after two chunks: the third solve fails.
        let mut calls = 0;
        let res = generate_shard(
            &p,
            &dir,
            0,
            2,
            |ids, pr, n| {
                calls += 1;
                if calls == 3 {
                    Err("killed".into())
                } else {
                    fake_solve(ids, pr, n)
                }
            },
            |_, _| {},
        );
        assert!(res.is_err());
        let c = census(&dir).unwrap();
        assert_eq!(c.present, 8);
        assert!(
            PairSet::load(&dir)
                .unwrap_err()
                .to_string()
                .contains("15 missing")
        );
        // A leftover temporary file from a killed write is ignored.
        std::fs::write(
            dir.join("shard-0-of-2/chunk-00002.safetensors.tmp"),
            b"partial",
        )
        .unwrap();
        // Rerun shard 0 (resumes at chunk 2), then shard 1.
        assert_eq!(
            generate_shard(&p, &dir, 0, 2, fake_solve, |_, _| {}).unwrap(),
            4
        );
        assert_eq!(
            generate_shard(&p, &dir, 1, 2, fake_solve, |_, _| {}).unwrap(),
            11
        );
        assert_eq!(
            generate_shard(&p, &dir, 1, 2, fake_solve, |_, _| {}).unwrap(),
            0
        );
        let set = PairSet::load(&dir).unwrap();
        assert_eq!(set.ids, (0..23).collect::<Vec<_>>());
        assert_eq!(&set.noise[4 * 7..4 * 8], p.noise(7).as_slice());
        assert_eq!(set.result[4 * 7], 2.0 * p.noise(7)[0]);
        assert_eq!(set.prompt(7), "b");
        // Other settings in the same folder are refused.
        let other = PairPlan {
            seed: 6,
            ..p.clone()
        };
        assert!(generate_shard(&other, &dir, 0, 1, fake_solve, |_, _| {}).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn noise_depends_only_on_the_id() {
        let p = plan();
        assert_eq!(p.noise(3), p.noise(3));
        assert_ne!(p.noise(3), p.noise(4));
        assert_eq!(
            p.chunks(1, 3),
            vec![vec![1, 4, 7, 10], vec![13, 16, 19, 22]]
        );
    }

    #[test]
    fn first_gaps_finds_the_smallest_missing_ids_without_listing_them_all() {
        let seen: BTreeSet<usize> = [0, 1, 3, 4, 7].into_iter().collect();
        assert_eq!(first_gaps(&seen, 10, 5), vec![2, 5, 6, 8, 9]);
        assert_eq!(first_gaps(&seen, 10, 2), vec![2, 5]);
        assert_eq!(first_gaps(&seen, 8, 5), vec![2, 5, 6]);
        assert_eq!(first_gaps(&BTreeSet::new(), MAX_PAIRS, 3), vec![0, 1, 2]);
        let all: BTreeSet<usize> = (0..4).collect();
        assert!(first_gaps(&all, 4, 5).is_empty());
    }
}
