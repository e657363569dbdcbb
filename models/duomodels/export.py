"""ONNX export in the Optimum / onnxruntime-genai convention.

Inputs: input_ids, attention_mask, position_ids [batch, seq] (int64) and
past_key_values.{i}.key|value [batch, kv_heads, past, head_dim] (float32).
Outputs: logits [batch, seq, vocab] and present.{i}.key|value. Weights are
stored as fp16 initializers followed by a Cast to fp32 (halves the files;
ONNX Runtime folds the casts at load).
"""

import pathlib

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, TensorProto

from .llama import Llama


class KvWrapper(torch.nn.Module):
    def __init__(self, model: Llama):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        logits, presents = self.m.forward_kv(input_ids, attention_mask, position_ids, list(past))
        return (logits, *presents)


def _names(n_layers):
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, present


def export(model: Llama, path: pathlib.Path):
    s = model.shape
    model = model.float().eval()
    past_names, present_names = _names(s.num_hidden_layers)
    b, t, p = 2, 3, 5
    ids = torch.randint(0, s.vocab_size, (b, t))
    mask = torch.ones(b, p + t, dtype=torch.int64)
    pos = torch.arange(p, p + t)[None].expand(b, t).contiguous()
    past = tuple(torch.randn(b, s.num_key_value_heads, p, s.head_dim) for _ in past_names)
    D = torch.export.Dim.DYNAMIC
    dyn = [{0: D, 1: D}, {0: D, 1: D}, {0: D, 1: D}, tuple({0: D, 2: D} for _ in past)]
    with torch.no_grad():
        prog = torch.onnx.export(
            KvWrapper(model),
            (ids, mask, pos, past),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=dyn,
            opset_version=18,
            dynamo=True,
            optimize=True,
        )
    proto = prog.model_proto
    _rename_dims(proto)
    _weights_to_fp16(proto)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def _rename_dims(proto):
    """Give the dynamic axes the conventional names."""
    def setdims(vi, names):
        dims = vi.type.tensor_type.shape.dim
        for d, n in zip(dims, names):
            if n is not None:
                d.ClearField("dim_value")
                d.dim_param = n
    for vi in proto.graph.input:
        if vi.name.startswith("past_key_values"):
            setdims(vi, ["batch_size", None, "past_sequence_length", None])
        elif vi.name == "attention_mask":
            setdims(vi, ["batch_size", "total_sequence_length"])
        else:
            setdims(vi, ["batch_size", "sequence_length"])
    for vi in proto.graph.output:
        if vi.name.startswith("present"):
            setdims(vi, ["batch_size", None, "total_sequence_length", None])
        else:
            setdims(vi, ["batch_size", "sequence_length", None])


def _weights_to_fp16(proto, min_elems: int = 1024):
    g = proto.graph
    new_inits, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elems:
            arr = numpy_helper.to_array(init).astype(np.float16)
            half = numpy_helper.from_array(arr, init.name + "_fp16")
            new_inits.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name="cast_" + init.name))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
