//! Device-side edits: the cache's structural edits (rollback, forking
//! branches, keeping one branch) and the selection of logits rows, run as
//! tiny ONNX graphs on the model's own execution provider, so a cache never
//! leaves the device it lives on and only the logits rows a caller asked
//! for reach host memory.
//!
//! Why graphs, and not the alternatives the runtime could have used:
//! - *A fixed-capacity cache with a logical length* (rejected positions
//!   hidden by `attention_mask`, explicit `position_ids`) needs no copy on
//!   rollback, but every forward then reads and carries the hidden
//!   positions, Optimum exports concatenate past and present on every run
//!   anyway (so the capacity is never reused in place), and models without a
//!   `position_ids` input could not use it at all.
//! - *cudarc copies on ORT's stream* would need a CUDA-only twin of every
//!   edit, so CI could not run the GPU's code path.
//! - *Graphs* (`Slice`, `Tile`) run through the very binding code the model
//!   runs through, on CPU in CI and on CUDA on a GPU, for any model. An edit
//!   costs one on-device copy of the kept part (a device-to-device copy of
//!   a 7B model's 512 MiB cache takes ~0.2 ms on an H100-class GPU, against
//!   ~40 ms for the round trip through host memory it replaces). On CPU it
//!   costs what the ndarray copies it replaced cost (measured by
//!   `duo bench-runtime`: `edit_ms` in its JSON).
//!
//! The edits always produce new values: a binding's outputs are fresh
//! allocations (a new [`IoBinding`] per run), so an edit never writes into
//! a cache that another sequence still holds.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ops::Range;
use std::sync::Mutex;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor};

use super::RuntimeError;
use crate::onnx_graph::{self, onnx};

/// The opset of the edit graphs (Slice with inputs, Tile: opset 13).
const EDIT_OPSET: i64 = 17;

/// Where a model's tensors live: its device, and the host.
#[derive(Debug)]
pub(crate) struct Placement {
    /// The model's device (CPU memory for the CPU execution provider).
    pub(crate) device: MemoryInfo<'static>,
    /// Host memory: where logits rows are delivered.
    pub(crate) host: MemoryInfo<'static>,
}

impl Placement {
    pub(crate) fn new(device: super::Device) -> Result<Self, RuntimeError> {
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        let device = match device {
            super::Device::Cpu => host.to_owned(),
            super::Device::Cuda(ordinal) => MemoryInfo::new(
                AllocationDevice::CUDA,
                ordinal,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
        };
        Ok(Self { device, host })
    }
}

/// Runs `session` with `inputs` bound where they are (no copy when they
/// already live on the session's device) and `outputs` bound to the given
/// memory; returns the outputs in the order asked. A new binding per run:
/// outputs are always fresh allocations.
pub(crate) fn run_bound(
    session: &mut Session,
    inputs: &[(&str, &DynValue)],
    outputs: &[(&str, &MemoryInfo<'_>)],
) -> Result<Vec<DynValue>, RuntimeError> {
    let mut binding: IoBinding = session.create_binding()?;
    for (name, value) in inputs {
        binding.bind_input(*name, *value)?;
    }
    for (name, mem) in outputs {
        binding.bind_output_to_device(*name, mem)?;
    }
    let mut out = session.run_binding(&binding)?;
    outputs
        .iter()
        .map(|(name, _)| {
            out.remove(*name)
                .ok_or_else(|| RuntimeError::Ort(format!("the run produced no `{name}` output")))
        })
        .collect()
}

/// Turns graph bytes into a session on the model's execution provider.
type GraphLoader = Box<dyn Fn(&[u8]) -> Result<Session, RuntimeError> + Send + Sync>;

/// The edit graphs of one model, built for its cache's tensor count and
/// element types and loaded on its execution provider.
pub(crate) struct Editor {
    /// `y_i = Slice(x_i, starts, ends, axes = [0, 2])` for every cache tensor.
    slice_kv: Mutex<Session>,
    /// `y_i = Tile(x_i, repeats)` for every cache tensor.
    tile_kv: Mutex<Session>,
    /// `rows = Slice(logits, starts, ends, axes = [0, 1])`.
    logit_rows: Mutex<Session>,
    /// Per batch size b (built on first use): for every cache tensor i,
    /// `y_i = Concat(Pad(x_i_0, pads_0), …, Pad(x_i_{b-1}, pads_{b-1}), axis 0)`
    /// — the caches of b sequences, each left-padded to a common length,
    /// stacked into one batch.
    stack_kv: Mutex<HashMap<usize, Session>>,
    /// Per number of pieces n (built on first use): for every cache tensor
    /// i and piece b, `y_i_b = Slice(x_i, starts_b, ends_b, axes = [0, 2])`
    /// — a batch's caches cut back into its parts in one run.
    unstack_kv: Mutex<HashMap<usize, Session>>,
    /// The same for logits (`axes = [0, 1]`): each part's rows in one run.
    unstack_logits: Mutex<HashMap<usize, Session>>,
    load: GraphLoader,
    kv_type: i32,
    logits_type: i32,
    placement: Placement,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl std::fmt::Debug for Editor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Editor")
            .field("tensors", &self.inputs.len())
            .finish()
    }
}

impl Editor {
    /// Builds the graphs for `tensors` cache tensors of ONNX element type
    /// `kv_type` and logits of `logits_type`; `load` turns graph bytes into
    /// a session on the model's execution provider (kept for the graphs
    /// built on first use).
    pub(crate) fn new(
        tensors: usize,
        kv_type: i32,
        logits_type: i32,
        placement: Placement,
        load: impl Fn(&[u8]) -> Result<Session, RuntimeError> + Send + Sync + 'static,
    ) -> Result<Self, RuntimeError> {
        let inputs: Vec<String> = (0..tensors).map(|i| format!("x{i}")).collect();
        let outputs: Vec<String> = (0..tensors).map(|i| format!("y{i}")).collect();
        let kv = |name: &str| onnx_graph::tensor_value(name, kv_type, &[None; 4]);
        let int64 = onnx::tensor_proto::DataType::Int64 as i32;
        let per_tensor = |op: &str, extra: &[&str], init: Vec<onnx::TensorProto>| {
            let mut graph = onnx::GraphProto {
                name: Some(format!("duo_edit_{}", op.to_lowercase())),
                initializer: init,
                ..Default::default()
            };
            for (x, y) in inputs.iter().zip(&outputs) {
                let mut args = vec![x.as_str()];
                args.extend_from_slice(extra);
                graph.node.push(onnx_graph::node(op, &args, y, &[]));
                graph.input.push(kv(x));
                graph.output.push(kv(y));
            }
            graph
        };
        let mut slice = per_tensor(
            "Slice",
            &["starts", "ends", "axes"],
            vec![onnx_graph::ints("axes", &[0, 2])],
        );
        slice
            .input
            .push(onnx_graph::tensor_value("starts", int64, &[Some(2)]));
        slice
            .input
            .push(onnx_graph::tensor_value("ends", int64, &[Some(2)]));
        let mut tile = per_tensor("Tile", &["repeats"], Vec::new());
        tile.input
            .push(onnx_graph::tensor_value("repeats", int64, &[Some(4)]));
        let rows = onnx::GraphProto {
            name: Some("duo_edit_logit_rows".into()),
            node: vec![onnx_graph::node(
                "Slice",
                &["logits", "starts", "ends", "axes"],
                "rows",
                &[],
            )],
            initializer: vec![onnx_graph::ints("axes", &[0, 1])],
            input: vec![
                onnx_graph::tensor_value("logits", logits_type, &[None; 3]),
                onnx_graph::tensor_value("starts", int64, &[Some(2)]),
                onnx_graph::tensor_value("ends", int64, &[Some(2)]),
            ],
            output: vec![onnx_graph::tensor_value("rows", logits_type, &[None; 3])],
            ..Default::default()
        };
        Ok(Self {
            slice_kv: Mutex::new(load(&onnx_graph::model_bytes(slice, EDIT_OPSET))?),
            tile_kv: Mutex::new(load(&onnx_graph::model_bytes(tile, EDIT_OPSET))?),
            logit_rows: Mutex::new(load(&onnx_graph::model_bytes(rows, EDIT_OPSET))?),
            stack_kv: Mutex::new(HashMap::new()),
            unstack_kv: Mutex::new(HashMap::new()),
            unstack_logits: Mutex::new(HashMap::new()),
            load: Box::new(load),
            kv_type,
            logits_type,
            placement,
            inputs,
            outputs,
        })
    }

    pub(crate) fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Every tensor sliced to batch rows `rows` and positions `positions`.
    pub(crate) fn slice(
        &self,
        kv: &[DynValue],
        rows: Range<usize>,
        positions: Range<usize>,
    ) -> Result<Vec<DynValue>, RuntimeError> {
        let starts = index_tensor(&[rows.start, positions.start])?;
        let ends = index_tensor(&[rows.end, positions.end])?;
        let mut session = lock(&self.slice_kv);
        self.per_tensor(&mut session, kv, &[("starts", &starts), ("ends", &ends)])
    }

    /// The caches of several batch-1 sequences (`caches[b]`: every tensor of
    /// sequence b, `lens[b]` positions) as one batch, each left-padded with
    /// zeros to the longest length: tensor i of the result is
    /// `[caches.len(), kv_heads, max(lens), head_dim]`, row b holding
    /// `max(lens) - lens[b]` padding positions, then sequence b's cache.
    pub(crate) fn stack(
        &self,
        caches: &[&[DynValue]],
        lens: &[usize],
    ) -> Result<Vec<DynValue>, RuntimeError> {
        let batch = caches.len();
        if batch != lens.len() || caches.iter().any(|c| c.len() != self.inputs.len()) {
            return Err(RuntimeError::Invalid(format!(
                "stacking {batch} caches with {} lengths for an editor of {} tensors",
                lens.len(),
                self.inputs.len()
            )));
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        let pads = lens
            .iter()
            .map(|&len| index_tensor(&[0, 0, longest - len, 0, 0, 0, 0, 0]))
            .collect::<Result<Vec<_>, _>>()?;
        let names = stack_input_names(self.inputs.len(), batch);
        let mut inputs: Vec<(&str, &DynValue)> = Vec::with_capacity(names.len() + batch);
        for (name, value) in names.iter().zip(caches.iter().flat_map(|c| c.iter())) {
            inputs.push((name.as_str(), value));
        }
        let pad_names: Vec<String> = (0..batch).map(|b| format!("pads{b}")).collect();
        for (name, pad) in pad_names.iter().zip(&pads) {
            inputs.push((name.as_str(), pad));
        }
        let mut graphs = self.stack_kv.lock().unwrap_or_else(|p| p.into_inner());
        let session = match graphs.entry(batch) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let graph = stack_graph(self.inputs.len(), batch, self.kv_type);
                e.insert((self.load)(&onnx_graph::model_bytes(graph, EDIT_OPSET))?)
            }
        };
        self.run_to_device(session, &inputs)
    }

    /// The pieces of a batch's cache `kv`: piece b is every tensor sliced to
    /// batch rows `cuts[b].0` and positions `cuts[b].1`, all cut in one run
    /// and left on the device (the inverse of [`Self::stack`]).
    pub(crate) fn unstack(
        &self,
        kv: &[DynValue],
        cuts: &[(Range<usize>, Range<usize>)],
    ) -> Result<Vec<Vec<DynValue>>, RuntimeError> {
        let pieces = self.cut(&self.unstack_kv, kv, self.kv_type, 4, [0, 2], cuts, false)?;
        let t = self.inputs.len();
        let mut pieces = pieces.into_iter();
        Ok((0..cuts.len())
            .map(|_| pieces.by_ref().take(t).collect())
            .collect())
    }

    /// Batch rows `cuts[b].0`, positions `cuts[b].1` of `logits`, for every
    /// b, cut in one run and delivered to host memory.
    pub(crate) fn logit_pieces(
        &self,
        logits: &DynValue,
        cuts: &[(Range<usize>, Range<usize>)],
    ) -> Result<Vec<DynValue>, RuntimeError> {
        let tensors = std::slice::from_ref(logits);
        self.cut(
            &self.unstack_logits,
            tensors,
            self.logits_type,
            3,
            [0, 1],
            cuts,
            true,
        )
    }

    /// Runs (building on first use) the graph that slices every tensor of
    /// `tensors` (element type `elem`, rank `rank`) once per cut along
    /// `axes`; outputs ordered by cut, then tensor.
    #[allow(clippy::too_many_arguments)]
    fn cut(
        &self,
        graphs: &Mutex<HashMap<usize, Session>>,
        tensors: &[DynValue],
        elem: i32,
        rank: usize,
        axes: [i64; 2],
        cuts: &[(Range<usize>, Range<usize>)],
        to_host: bool,
    ) -> Result<Vec<DynValue>, RuntimeError> {
        let (t, n) = (tensors.len(), cuts.len());
        let bounds = cuts
            .iter()
            .map(|(rows, positions)| {
                Ok((
                    index_tensor(&[rows.start, positions.start])?,
                    index_tensor(&[rows.end, positions.end])?,
                ))
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let x: Vec<String> = (0..t).map(|i| format!("x{i}")).collect();
        let s: Vec<String> = (0..n).map(|b| format!("s{b}")).collect();
        let e: Vec<String> = (0..n).map(|b| format!("e{b}")).collect();
        let y: Vec<String> = (0..n)
            .flat_map(|b| (0..t).map(move |i| format!("y{i}_{b}")))
            .collect();
        let mut inputs: Vec<(&str, &DynValue)> = Vec::with_capacity(t + 2 * n);
        inputs.extend(x.iter().map(String::as_str).zip(tensors));
        for (b, (start, end)) in bounds.iter().enumerate() {
            inputs.push((s[b].as_str(), start));
            inputs.push((e[b].as_str(), end));
        }
        let place = if to_host {
            &self.placement.host
        } else {
            &self.placement.device
        };
        let outputs: Vec<(&str, &MemoryInfo<'_>)> = y.iter().map(|o| (o.as_str(), place)).collect();
        let mut graphs = graphs.lock().unwrap_or_else(|p| p.into_inner());
        let session = match graphs.entry(n) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(entry) => {
                let int64 = onnx::tensor_proto::DataType::Int64 as i32;
                let mut graph = onnx::GraphProto {
                    name: Some(format!("duo_edit_cut{n}")),
                    initializer: vec![onnx_graph::ints("axes", &axes)],
                    ..Default::default()
                };
                let shape = vec![None; rank];
                for name in &x {
                    graph
                        .input
                        .push(onnx_graph::tensor_value(name, elem, &shape));
                }
                for b in 0..n {
                    graph
                        .input
                        .push(onnx_graph::tensor_value(&s[b], int64, &[Some(2)]));
                    graph
                        .input
                        .push(onnx_graph::tensor_value(&e[b], int64, &[Some(2)]));
                    for (i, xi) in x.iter().enumerate() {
                        let out = &y[b * t + i];
                        graph.node.push(onnx_graph::node(
                            "Slice",
                            &[xi, &s[b], &e[b], "axes"],
                            out,
                            &[],
                        ));
                        graph
                            .output
                            .push(onnx_graph::tensor_value(out, elem, &shape));
                    }
                }
                entry.insert((self.load)(&onnx_graph::model_bytes(graph, EDIT_OPSET))?)
            }
        };
        run_bound(session, &inputs, &outputs)
    }

    /// Every tensor (batch 1) repeated into `k` batch rows.
    pub(crate) fn tile(&self, kv: &[DynValue], k: usize) -> Result<Vec<DynValue>, RuntimeError> {
        let repeats = index_tensor(&[k, 1, 1, 1])?;
        let mut session = lock(&self.tile_kv);
        self.per_tensor(&mut session, kv, &[("repeats", &repeats)])
    }

    /// Positions `positions` of batch rows `rows` of `logits`, delivered to
    /// host memory.
    pub(crate) fn logit_rows(
        &self,
        logits: &DynValue,
        rows: Range<usize>,
        positions: Range<usize>,
    ) -> Result<DynValue, RuntimeError> {
        let starts = index_tensor(&[rows.start, positions.start])?;
        let ends = index_tensor(&[rows.end, positions.end])?;
        let mut session = lock(&self.logit_rows);
        let mut out = run_bound(
            &mut session,
            &[("logits", logits), ("starts", &starts), ("ends", &ends)],
            &[("rows", &self.placement.host)],
        )?;
        out.pop()
            .ok_or_else(|| RuntimeError::Ort("the row selection produced nothing".into()))
    }

    fn per_tensor(
        &self,
        session: &mut Session,
        kv: &[DynValue],
        args: &[(&str, &DynValue)],
    ) -> Result<Vec<DynValue>, RuntimeError> {
        if kv.len() != self.inputs.len() {
            return Err(RuntimeError::Invalid(format!(
                "a cache of {} tensors given to an editor built for {}",
                kv.len(),
                self.inputs.len()
            )));
        }
        let mut inputs: Vec<(&str, &DynValue)> = self
            .inputs
            .iter()
            .map(String::as_str)
            .zip(kv.iter())
            .collect();
        inputs.extend_from_slice(args);
        self.run_to_device(session, &inputs)
    }

    /// Runs an edit graph with every output (`y{i}`) bound to the device.
    fn run_to_device(
        &self,
        session: &mut Session,
        inputs: &[(&str, &DynValue)],
    ) -> Result<Vec<DynValue>, RuntimeError> {
        let outputs: Vec<(&str, &MemoryInfo<'_>)> = self
            .outputs
            .iter()
            .map(|o| (o.as_str(), &self.placement.device))
            .collect();
        run_bound(session, inputs, &outputs)
    }
}

/// Input names of the stacking graph for `batch` sequences: sequence b's
/// tensor i is `x{i}_{b}`, ordered by sequence, then tensor.
fn stack_input_names(tensors: usize, batch: usize) -> Vec<String> {
    (0..batch)
        .flat_map(|b| (0..tensors).map(move |i| format!("x{i}_{b}")))
        .collect()
}

/// The stacking graph (see [`Editor::stack`]) for `tensors` cache tensors of
/// element type `kv_type` and `batch` sequences.
fn stack_graph(tensors: usize, batch: usize, kv_type: i32) -> onnx::GraphProto {
    let int64 = onnx::tensor_proto::DataType::Int64 as i32;
    let mut graph = onnx::GraphProto {
        name: Some(format!("duo_edit_stack{batch}")),
        ..Default::default()
    };
    for name in stack_input_names(tensors, batch) {
        graph
            .input
            .push(onnx_graph::tensor_value(&name, kv_type, &[None; 4]));
    }
    for b in 0..batch {
        graph.input.push(onnx_graph::tensor_value(
            &format!("pads{b}"),
            int64,
            &[Some(8)],
        ));
    }
    for i in 0..tensors {
        let padded: Vec<String> = (0..batch).map(|b| format!("p{i}_{b}")).collect();
        for (b, out) in padded.iter().enumerate() {
            graph.node.push(onnx_graph::node(
                "Pad",
                &[&format!("x{i}_{b}"), &format!("pads{b}")],
                out,
                &[],
            ));
        }
        let args: Vec<&str> = padded.iter().map(String::as_str).collect();
        let y = format!("y{i}");
        graph
            .node
            .push(onnx_graph::node("Concat", &args, &y, &[("axis", 0)]));
        graph
            .output
            .push(onnx_graph::tensor_value(&y, kv_type, &[None; 4]));
    }
    graph
}

/// A poisoned lock is recovered: an edit session holds no state between runs.
fn lock(m: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Positions as an int64 host tensor (ONNX Runtime reads Slice's and Tile's
/// index inputs from host memory on every execution provider).
fn index_tensor(v: &[usize]) -> Result<DynValue, RuntimeError> {
    let data: Vec<i64> = v
        .iter()
        .map(|&x| i64::try_from(x).unwrap_or(i64::MAX))
        .collect();
    Ok(Tensor::from_array(([v.len()], data))?.into_dyn())
}
