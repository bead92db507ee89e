//! Which input shapes have a recorded CUDA graph of the forward pass, and when
//! to record one.
//!
//! A shape is recorded after it has run eagerly [`EAGER_RUNS_BEFORE_RECORDING`]
//! times (cuDNN's autotuning and TorchScript's profiling executor must have
//! settled first: what they do on a first run cannot be recorded), and at most
//! `capacity` shapes keep a graph; the least recently used one is dropped to
//! make room, since each holds a forward pass's worth of GPU memory. A shape
//! whose recording failed is not tried again.

use std::collections::{HashMap, HashSet};

use tch::Tensor;

use super::cuda_graph::CudaGraph;

/// Eager passes a shape needs before it is recorded: the first autotunes
/// cuDNN and profiles the TorchScript graph, the second runs the optimised
/// graph for the first time (compiling its fused kernels).
pub const EAGER_RUNS_BEFORE_RECORDING: u32 = 2;

/// Padded input height and width, and whether the pass also computes the
/// uncertainty (the model's second method: another graph).
pub type Shape = (i64, i64, bool);

/// A recorded forward pass with the tensors it reads and writes. The inputs
/// are copied into before each replay; the outputs are overwritten by it.
pub struct RecordedForward {
    pub left: Tensor,
    pub right: Tensor,
    pub outputs: Vec<Tensor>,
    // Declared last: dropped after nothing else refers to its memory pool's tensors.
    pub graph: CudaGraph,
}

/// What to do for the next forward pass at a shape.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Replay the recorded graph.
    Replay,
    /// Run eagerly (too few runs yet, or recording failed before).
    Eager,
    /// Record now, then replay; `evict` first when the cache is full.
    Record { evict: Option<Shape> },
}

/// The recorded shapes, most recently used last.
pub struct GraphCache {
    capacity: usize,
    recorded: Vec<(Shape, RecordedForward)>,
    eager_runs: HashMap<Shape, u32>,
    failed: HashSet<Shape>,
}

impl GraphCache {
    pub fn new(capacity: usize) -> GraphCache {
        GraphCache { capacity, recorded: Vec::new(), eager_runs: HashMap::new(), failed: HashSet::new() }
    }

    /// Decides the next pass at `shape` (counting it when it is eager).
    pub fn plan(&mut self, shape: Shape) -> Plan {
        if self.capacity == 0 || self.failed.contains(&shape) {
            return Plan::Eager;
        }
        if let Some(i) = self.recorded.iter().position(|(s, _)| *s == shape) {
            let entry = self.recorded.remove(i);
            self.recorded.push(entry);
            return Plan::Replay;
        }
        let runs = self.eager_runs.entry(shape).or_insert(0);
        if *runs < EAGER_RUNS_BEFORE_RECORDING {
            *runs += 1;
            return Plan::Eager;
        }
        let evict = (self.recorded.len() >= self.capacity).then(|| self.recorded[0].0);
        Plan::Record { evict }
    }

    /// The graph for `shape`, if recorded.
    pub fn get(&self, shape: Shape) -> Option<&RecordedForward> {
        self.recorded.iter().find(|(s, _)| *s == shape).map(|(_, r)| r)
    }

    pub fn evict(&mut self, shape: Shape) {
        self.recorded.retain(|(s, _)| *s != shape);
    }

    pub fn insert(&mut self, shape: Shape, recorded: RecordedForward) {
        self.evict(shape);
        self.recorded.push((shape, recorded));
    }

    /// Remembers that `shape` cannot be recorded: it runs eagerly from now on.
    pub fn mark_failed(&mut self, shape: Shape) {
        self.evict(shape);
        self.failed.insert(shape);
    }

    /// Recorded shapes, least recently used first.
    pub fn shapes(&self) -> Vec<Shape> {
        self.recorded.iter().map(|(s, _)| *s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only the planning is testable without a GPU: entries cannot be made here,
    // so these tests drive `plan` and `mark_failed` on an empty cache.
    #[test]
    fn a_shape_is_recorded_after_its_eager_runs() {
        let mut cache = GraphCache::new(2);
        assert_eq!(cache.plan((384, 1248, false)), Plan::Eager);
        assert_eq!(cache.plan((384, 1248, false)), Plan::Eager);
        assert_eq!(cache.plan((384, 1248, false)), Plan::Record { evict: None });
        // Counting is per shape.
        assert_eq!(cache.plan((256, 512, false)), Plan::Eager);
    }

    #[test]
    fn a_failed_shape_stays_eager_and_no_capacity_means_never() {
        let mut cache = GraphCache::new(2);
        for _ in 0..EAGER_RUNS_BEFORE_RECORDING {
            cache.plan((256, 256, false));
        }
        cache.mark_failed((256, 256, false));
        for _ in 0..5 {
            assert_eq!(cache.plan((256, 256, false)), Plan::Eager);
        }
        let mut off = GraphCache::new(0);
        for _ in 0..5 {
            assert_eq!(off.plan((256, 256, false)), Plan::Eager);
        }
        assert!(off.shapes().is_empty());
    }
}
