//! The **gpu-like** stand-in pair: the bundled models, decoding exactly as
//! trained, with a ballast that gives them the cost structure of a 7B target
//! on a GPU beside a small draft on a CPU (`docs/benchmark.md`, "Regimes").
//!
//! Each model gets a side branch computed from its own logits, multiplied by
//! an exact `0.0` and added back to the logits. `x + 0.0 == x` bit for bit
//! for every finite `x` (and the ballast stays finite: every ballast matrix
//! averages its input), so the stand-in's logits are the original's, bit for
//! bit (tested in `duo-core/tests/gpu_like.rs`). The branch depends on the
//! input, so ONNX Runtime can neither fold nor prune it: its cost is paid on
//! every forward. Its weights are `ConstantOfShape` nodes, materialised when
//! the session loads, so a stand-in file is no larger than its source.
//!
//! - Target: [`Ballast::Flat`] — the logits summed over rows and tokens, then
//!   a fixed block of matrix products: a cost that does not depend on how
//!   many tokens or rows the forward carries, as a weight-bound GPU forward
//!   of a 7B model verifies 8–16 tokens for about the cost of one.
//! - Draft: [`Ballast::PerToken`] — every row through its own matrix
//!   products, like extra decoder layers: a cost that grows with the tokens,
//!   as a CPU model's does.
//!
//! Quality is the small pair's; only the costs change. It is a cost
//! stand-in, not a bigger model.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::onnx_graph::node;
use crate::onnx_graph::onnx::{
    self, AttributeProto, ModelProto, NodeProto, TensorProto, attribute_proto, tensor_proto,
};

/// A ballast branch; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Ballast {
    /// `layers` products of a `[rows, width]` block with one `[width, width]`
    /// matrix, fed by the logits summed over the forward's rows and tokens.
    Flat {
        width: usize,
        rows: usize,
        layers: usize,
    },
    /// Every logits row through `layers` distinct `[width, width]` matrices.
    PerToken { width: usize, layers: usize },
}

/// The gpu-like target's ballast: ~20 ms per forward on one core of the
/// project's 2-vCPU VM, flat from 1 to 16 tokens (measured by
/// `duo bench --regime gpu-like`, which prints the cost structure).
pub const TARGET_BALLAST: Ballast = Ballast::Flat {
    width: 1024,
    rows: 256,
    layers: 6,
};

/// The gpu-like draft's ballast: a step ~1.2 ms on one core (10–20× below
/// the target's forward, as a 68M draft on a CPU beside a 7B target on a
/// GPU), growing with the rows as a CPU model's does.
pub const DRAFT_BALLAST: Ballast = Ballast::PerToken {
    width: 2048,
    layers: 1,
};

/// Bumped whenever the construction changes, so cached stand-ins are rebuilt.
const CONSTRUCTION_VERSION: u32 = 1;

/// The name the original logits take inside a stand-in.
const LOGITS_IN: &str = "duo_ballast.logits_in";

#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an ONNX model ({source})")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path}: cannot add a ballast: {why}")]
    Unsupported { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StandInError + '_ {
    move |source| StandInError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where [`gpu_like_pair`] put the stand-ins.
#[derive(Debug, Clone)]
pub struct StandInPair {
    pub target: PathBuf,
    pub draft: PathBuf,
    /// False when both came from the cache.
    pub built: bool,
}

/// The gpu-like stand-ins of the `target` and `draft` models (folders, or
/// `.onnx` files), under `cache/target` and `cache/draft`: reused when
/// their stamp says they were made from the same source files by the same
/// construction, (re)built otherwise. Deterministic: the same sources give
/// the same files.
pub fn gpu_like_pair(
    target: &Path,
    draft: &Path,
    cache: &Path,
) -> Result<StandInPair, StandInError> {
    let target_dst = cache.join("target");
    let draft_dst = cache.join("draft");
    let built_target = ensure_stand_in(target, &target_dst, TARGET_BALLAST)?;
    let built_draft = ensure_stand_in(draft, &draft_dst, DRAFT_BALLAST)?;
    Ok(StandInPair {
        target: target_dst,
        draft: draft_dst,
        built: built_target || built_draft,
    })
}

/// Makes `dst` the stand-in of the model folder `src` unless its stamp is
/// current; returns whether it (re)built.
pub fn ensure_stand_in(src: &Path, dst: &Path, ballast: Ballast) -> Result<bool, StandInError> {
    let (src, model) = if src.is_dir() {
        (src, src.join("model.onnx"))
    } else {
        (src.parent().unwrap_or(Path::new(".")), src.to_path_buf())
    };
    let bytes = std::fs::read(&model).map_err(io(&model))?;
    let stamp = stamp(&bytes, ballast);
    let stamp_path = dst.join("stand-in.json");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(false);
    }
    let out = add_ballast(&bytes, &model, ballast)?;
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    // Everything beside the model (config.json, generation_config.json, …)
    // comes along; external weight files too, since initializers keep their
    // relative locations.
    for entry in std::fs::read_dir(src).map_err(io(src))? {
        let entry = entry.map_err(io(src))?;
        let name = entry.file_name();
        let from = entry.path();
        let skip = from
            .extension()
            .is_some_and(|e| e == "onnx" || e == "safetensors" || e == "tmp");
        if skip || !from.is_file() {
            continue;
        }
        let to = dst.join(&name);
        std::fs::copy(&from, &to).map_err(io(&to))?;
    }
    let tmp = dst.join("model.onnx.tmp");
    std::fs::write(&tmp, out).map_err(io(&tmp))?;
    let final_path = dst.join("model.onnx");
    std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    std::fs::write(&stamp_path, stamp).map_err(io(&stamp_path))?;
    Ok(true)
}

/// What a stand-in was made from: construction, ballast and source hash.
fn stamp(source: &[u8], ballast: Ballast) -> String {
    let mut h = std::hash::DefaultHasher::new();
    source.hash(&mut h);
    serde_json::json!({
        "what": "gpu-like cost stand-in: the source model's logits, bit for bit, plus an exact-zero ballast (duo-core/src/gpu_like.rs)",
        "construction": CONSTRUCTION_VERSION,
        "ballast": ballast,
        "source_bytes": source.len(),
        "source_hash": format!("{:016x}", h.finish()),
    })
    .to_string()
}

/// The model in `bytes` (read from `path`, for messages) with `ballast`
/// added to its `logits` output; returns the new model's bytes.
pub fn add_ballast(bytes: &[u8], path: &Path, ballast: Ballast) -> Result<Vec<u8>, StandInError> {
    let unsupported = |why: String| StandInError::Unsupported {
        path: path.to_path_buf(),
        why,
    };
    let mut model = ModelProto::decode(bytes).map_err(|source| StandInError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(0);
    if opset < 13 {
        return Err(unsupported(format!(
            "needs ONNX opset 13 or later (ReduceSum with axes as an input), the model has {opset}"
        )));
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| unsupported("no graph".into()))?;
    let vocab = graph
        .output
        .iter()
        .find(|o| o.name.as_deref() == Some("logits"))
        .and_then(|o| match &o.r#type.as_ref()?.value {
            Some(onnx::type_proto::Value::TensorType(t)) => {
                t.shape.as_ref()?.dim.last()?.value.clone()
            }
            _ => None,
        })
        .and_then(|v| match v {
            onnx::tensor_shape_proto::dimension::Value::DimValue(n) if n > 0 => Some(n as usize),
            _ => None,
        })
        .ok_or_else(|| {
            unsupported("no `logits` output with a fixed vocabulary dimension".into())
        })?;
    if graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == LOGITS_IN))
    {
        return Err(unsupported("it already has a ballast".into()));
    }
    let mut renamed = 0;
    for node in &mut graph.node {
        for o in node.output.iter_mut().filter(|o| *o == "logits") {
            *o = LOGITS_IN.into();
            renamed += 1;
        }
        for i in node.input.iter_mut().filter(|i| *i == "logits") {
            *i = LOGITS_IN.into();
        }
    }
    if renamed != 1 {
        return Err(unsupported(format!("{renamed} nodes write `logits`")));
    }
    let mut b = Builder::default();
    let last = match ballast {
        Ballast::Flat {
            width,
            rows,
            layers,
        } => {
            let axes = b.ints("axes", &[0, 1]);
            let summed = b.node("ReduceSum", &[LOGITS_IN, &axes], &[("keepdims", 1)]);
            let w_in = b.matrix("w_in", vocab, width);
            let h = b.node("MatMul", &[&summed, &w_in], &[]);
            let shape = b.ints("block", &[1, rows as i64, width as i64]);
            let block = b.node("Expand", &[&h, &shape], &[]);
            let w = b.matrix("w", width, width);
            (0..layers).fold(block, |x, _| b.node("MatMul", &[&x, &w], &[]))
        }
        Ballast::PerToken { width, layers } => {
            let w_in = b.matrix("w_in", vocab, width);
            let h = b.node("MatMul", &[LOGITS_IN, &w_in], &[]);
            (0..layers).fold(h, |x, i| {
                let w = b.matrix(&format!("w{i}"), width, width);
                b.node("MatMul", &[&x, &w], &[])
            })
        }
    };
    let total = b.node("ReduceSum", &[&last], &[("keepdims", 0)]);
    let zero = b.scalar("zero", 0.0);
    let nothing = b.node("Mul", &[&total, &zero], &[]);
    b.nodes
        .push(node("Add", &[LOGITS_IN, &nothing], "logits", &[]));
    graph.node.extend(b.nodes);
    graph.initializer.extend(b.initializers);
    Ok(model.encode_to_vec())
}

/// Accumulates the ballast's nodes and constants, each named `duo_ballast.*`.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next: usize,
}

impl Builder {
    fn name(&mut self, what: &str) -> String {
        self.next += 1;
        format!("duo_ballast.{what}.{}", self.next)
    }

    /// A node with one output; returns the output's name.
    fn node(&mut self, op: &str, inputs: &[&str], ints: &[(&str, i64)]) -> String {
        let out = self.name(&op.to_lowercase());
        self.nodes.push(node(op, inputs, &out, ints));
        out
    }

    fn ints(&mut self, what: &str, v: &[i64]) -> String {
        let name = self.name(what);
        self.initializers.push(crate::onnx_graph::ints(&name, v));
        name
    }

    fn scalar(&mut self, what: &str, v: f32) -> String {
        let name = self.name(what);
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(tensor_proto::DataType::Float as i32),
            float_data: vec![v],
            ..Default::default()
        });
        name
    }

    /// A `[rows, cols]` matrix filled with `1/rows` (a power of two for the
    /// sizes used, so exact): its product averages the input, which keeps
    /// every ballast value finite.
    fn matrix(&mut self, what: &str, rows: usize, cols: usize) -> String {
        let shape = self.ints(&format!("{what}_shape"), &[rows as i64, cols as i64]);
        let out = self.name(what);
        let mut n = node("ConstantOfShape", &[&shape], &out, &[]);
        n.attribute.push(AttributeProto {
            name: Some("value".into()),
            r#type: Some(attribute_proto::AttributeType::Tensor as i32),
            t: Some(TensorProto {
                dims: vec![1],
                data_type: Some(tensor_proto::DataType::Float as i32),
                float_data: vec![1.0 / rows as f32],
                ..Default::default()
            }),
            ..Default::default()
        });
        self.nodes.push(n);
        out
    }
}
