//! Data-parallel training: a group of workers — one per device, each on its own thread, on one
//! machine or several — takes equal shares of every batch, and the gradients are averaged across
//! the group before each optimizer step, so every worker keeps identical weights.
//!
//! The communication is burn-collective's all-reduce: a tree over the devices of a machine, then a
//! tree between the machines, which find each other through its orchestrator. This module only
//! decides *what* is reduced and in which order, identically on every worker.

use std::ops::Range;
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation, all_reduce,
    finish_collective, register,
};

/// A worker's share of this machine's CPU threads for the kernels it runs.
///
/// Workers of one machine that share rayon's global pool queue each operation behind the other
/// workers' (every op of a small model is split over all threads, so both workers wait on both
/// threads at every op); each worker instead runs its steps in its own pool of
/// `threads / workers`, where `threads` is the global pool's size (`RAYON_NUM_THREADS` or the
/// core count).
pub struct CpuShare(Option<rayon::ThreadPool>);

impl CpuShare {
    /// The share of one of `workers` workers on this machine; the global pool when alone.
    pub fn of(workers: usize) -> Self {
        if workers <= 1 {
            return Self(None);
        }
        let threads = (rayon::current_num_threads() / workers).max(1);
        Self(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("worker-pool-{i}"))
                .build()
                .ok(),
        )
    }

    /// Run `f` with its parallel work confined to this share.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.0 {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

/// The machines of a run, as seen from one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// Machines taking part.
    pub count: u32,
    /// The orchestrator's `HOST:PORT` (machine 0 runs it).
    pub coordinator: String,
    /// `HOST:PORT` at which the other machines reach this one (its tensor service's port).
    pub address: String,
}

impl Nodes {
    fn port(&self) -> Result<u16, String> {
        port_of(&self.address)
    }
}

/// The port of a `HOST:PORT`, or a message naming the address.
pub fn port_of(address: &str) -> Result<u16, String> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => port
            .parse()
            .map_err(|_| format!("`{address}`: `{port}` is not a port number")),
        _ => Err(format!("`{address}` is not HOST:PORT")),
    }
}

/// burn-communication prints every connection at INFO level on stderr unless a subscriber is
/// already installed; errors reach the user through the results of the calls instead.
/// `INSTAFLOW_NETWORK_LOG=1` keeps those lines (to diagnose a network).
fn quiet_network_logs() {
    if std::env::var_os("INSTAFLOW_NETWORK_LOG").is_some() {
        return;
    }
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
}

fn ws(address: &str) -> Result<burn_communication::Address, String> {
    port_of(address)?;
    format!("ws://{address}").parse()
}

/// Run the orchestrator through which the machines of a run find each other, on `port` of this
/// machine, on a background thread for the life of the process.
pub fn spawn_orchestrator(port: u16) -> Result<(), String> {
    quiet_network_logs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the orchestrator: {e}"))?;
    std::thread::spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)));
    Ok(())
}

/// One worker's place in a data-parallel group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// This worker's index in the group (machine by machine).
    pub rank: usize,
    /// Workers in the group (on all machines).
    pub count: usize,
    /// Workers on this machine.
    pub local: usize,
    /// The machines, when there are several.
    pub nodes: Option<Nodes>,
}

impl Replica {
    /// The rows of a `batch` this worker computes (an equal share; see [`Replica::check_batch`]).
    pub fn rows(&self, batch: usize) -> Range<usize> {
        let share = batch / self.count;
        self.rank * share..(self.rank + 1) * share
    }

    /// A batch must split evenly, or the mean of the workers' losses would not be the batch's.
    pub fn check_batch(&self, batch: usize) -> Result<(), String> {
        if !batch.is_multiple_of(self.count) || batch < self.count {
            return Err(format!(
                "--batch {batch} does not split evenly over {} workers: use a multiple of {}",
                self.count, self.count
            ));
        }
        Ok(())
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// Join the group. Every worker calls this once, from its own thread, before training;
    /// it returns when the whole group (every machine) has joined.
    pub fn join<B: AutodiffBackend>(&self, device: &B::Device) -> Result<(), String> {
        let mut config = CollectiveConfig::default().with_num_devices(self.local);
        if let Some(n) = &self.nodes {
            quiet_network_logs();
            config = config
                .with_num_nodes(n.count)
                // A ring cuts each tensor into one slice per machine, which a loss value or a
                // small bias cannot be.
                .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2))
                .with_global_address(ws(&n.coordinator)?)
                .with_node_address(ws(&n.address)?)
                .with_data_service_port(n.port()?);
        }
        register::<B::InnerBackend>(self.peer(), device.clone(), config).map_err(describe)
    }

    /// Leave the group at the end of a run (every worker, like [`Replica::join`]).
    pub fn leave<B: AutodiffBackend>(&self) -> Result<(), String> {
        finish_collective::<B::InnerBackend>(self.peer()).map_err(describe)
    }

    /// The mean of `values` over the group (the same on every worker).
    pub fn mean<B: Backend>(&self, values: &[f32], device: &B::Device) -> Result<Vec<f32>, String> {
        let t = Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
        let t = all_reduce::<B>(
            self.peer(),
            t.into_primitive().tensor(),
            ReduceOperation::Mean,
        )
        .map_err(describe)?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t))
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))
    }

    /// Replace every gradient of `model` by its mean over the group. Returns the seconds spent.
    pub fn mean_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<f64, String> {
        let start = Instant::now();
        // Parameters are visited in the module's order, which is the same on every worker.
        let mut visitor = MeanGradients::<B> {
            grads,
            peer: self.peer(),
            error: None,
            backend: std::marker::PhantomData,
        };
        model.visit(&mut visitor);
        match visitor.error {
            Some(e) => Err(describe(e)),
            None => Ok(start.elapsed().as_secs_f64()),
        }
    }
}

struct MeanGradients<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    peer: PeerId,
    error: Option<CollectiveError>,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for MeanGradients<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        // Every worker runs the same graph, so the same parameters have gradients everywhere.
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        match all_reduce::<B::InnerBackend>(
            self.peer,
            grad.into_primitive().tensor(),
            ReduceOperation::Mean,
        ) {
            Ok(mean) => self.grads.register(
                param.id,
                Tensor::<B::InnerBackend, D>::from_primitive(TensorPrimitive::Float(mean)),
            ),
            Err(e) => self.error = Some(e),
        }
    }
}

fn describe(e: CollectiveError) -> String {
    match e {
        CollectiveError::Global(e) => format!(
            "the connection to another machine of the run was lost or refused ({e:?}); the last \
             checkpoint is kept"
        ),
        e => format!("data-parallel group: {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_in_equal_shares_in_rank_order() {
        let r = |rank| Replica {
            rank,
            count: 4,
            local: 2,
            nodes: None,
        };
        assert_eq!(r(0).rows(32), 0..8);
        assert_eq!(r(3).rows(32), 24..32);
        assert!(r(0).check_batch(32).is_ok());
        let e = r(0).check_batch(30).unwrap_err();
        assert!(
            e.contains("--batch 30 does not split evenly over 4 workers"),
            "{e}"
        );
        assert!(r(0).check_batch(0).is_err());
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert_eq!(port_of("10.0.0.1:6500"), Ok(6500));
        assert_eq!(port_of("node-3.cluster:1"), Ok(1));
        for bad in ["10.0.0.1", ":6500", "host:http", "host:70000"] {
            assert!(port_of(bad).is_err(), "{bad}");
        }
        assert_eq!(ws("127.0.0.1:9").unwrap().to_string(), "ws://127.0.0.1:9");
    }
}
