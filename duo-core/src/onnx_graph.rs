//! Building ONNX graphs in Rust: the protobuf types generated from the
//! vendored `proto/onnx.proto` (onnx 1.23.2, Apache-2.0) and the few
//! helpers the crate's graph builders share (the gpu-like ballast in
//! [`crate::gpu_like`], the device-side cache edits in
//! [`crate::runtime::edit`]).

#[allow(clippy::all, missing_docs)]
pub(crate) mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto, attribute_proto, tensor_shape_proto, type_proto,
};

/// A node with one output and integer attributes.
pub(crate) fn node(op: &str, inputs: &[&str], output: &str, ints: &[(&str, i64)]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{output}.node")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: ints
            .iter()
            .map(|(k, v)| AttributeProto {
                name: Some((*k).into()),
                r#type: Some(attribute_proto::AttributeType::Int as i32),
                i: Some(*v),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A 1-D int64 constant.
pub(crate) fn ints(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(onnx::tensor_proto::DataType::Int64 as i32),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

/// A graph input or output: a tensor of `elem_type` (an
/// `onnx::tensor_proto::DataType` value) whose dimensions are all symbolic
/// (named `{name}.d{i}`) or, for `Some(n)`, fixed.
pub(crate) fn tensor_value(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                None => tensor_shape_proto::dimension::Value::DimParam(format!("{name}.d{i}")),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(onnx::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A model of `graph` at the default-domain opset `opset`, serialised.
pub(crate) fn model_bytes(graph: GraphProto, opset: i64) -> Vec<u8> {
    use prost::Message;
    ModelProto {
        // IR version 8 goes with opsets up to 18 (ONNX's versioning table).
        ir_version: Some(8),
        producer_name: Some("duo-core".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
