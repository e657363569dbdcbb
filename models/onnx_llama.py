"""Build a Llama decoder as ONNX without torch (onnx.helper + numpy).

The graph follows the Hugging Face Optimum / onnxruntime-genai KV-cache
convention that duo-core's runtime loads (duo-core/src/runtime/model.rs):

  inputs   input_ids, position_ids          int64 [batch, seq]
           attention_mask                   int64 [batch, past + seq]  (0 = masked key)
           past_key_values.{i}.key|value    DTYPE [batch, kv_heads, past, head_dim]
  outputs  logits                           DTYPE [batch, seq, vocab]
           present.{i}.key|value            DTYPE [batch, kv_heads, past + seq, head_dim]

with dynamic batch, seq and past, and the numerics of models/duomodels/llama.py
(= transformers' LlamaForCausalLM): RMSNorm, RoPE at position_ids, GQA with the
causal mask combined with attention_mask, SiLU MLP, tied or untied LM head.
Standard ONNX operators only (opset 17), so CPU and CUDA providers run it.

DTYPE (--dtype) is the storage and I/O dtype (weights, KV cache, logits);
--compute the arithmetic dtype (default DTYPE). f16 storage with f32 compute
casts weights and KV to f32 in the graph, so ONNX Runtime's CPU provider runs
an fp16-interface model. With f16 compute, RMSNorm statistics and softmax stay
in f32 (as in transformers). Attention reads the cache as stored (rounded to
DTYPE), so incremental decoding matches a full prefill.

--weights PATH (model.safetensors or .index.json; F32/F16/BF16; LlamaForCausalLM
names; or a torch-exported Llama model.onnx such as models/target/model.onnx,
whose weights are read back bit for bit) takes the shape from the config.json
beside it; --random draws N(0, 0.02)
weights (norms 1) from --seed in the shape the flags give. Weights over 1 GiB
(or --external) go to model.onnx.data tensor by tensor (protobuf's limit is
2 GiB), so a 1B model builds in little RAM. Writes model.onnx [+ .data],
config.json [+ the source's generation_config.json]; --check then runs check().

  python models/onnx_llama.py --out DIR --random --hidden 2048 --layers 16 \
      --heads 32 --kv-heads 8 --ffn 5632 --vocab 32000 --dtype f16 --compute f32 --check
  python models/onnx_llama.py --out DIR --weights models/target/model.onnx \
      --dtype f16 --compute f32 --check
"""

import argparse
import json
import pathlib
import shutil
import struct
import sys
import time
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NP = {"f32": np.float32, "f16": np.float16}
TP = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16}
HF_DTYPE = {"f32": "float32", "f16": "float16"}
EXTERNAL_ABOVE = 1 << 30  # bytes of weights (protobuf's hard limit is 2 GiB; inline costs ~3x RAM)
DATA_FILE = "model.onnx.data"


class SafeTensors:
    """Memory-mapped safetensors reader (one file or a sharded index); BF16 -> f32."""

    DT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

    def __init__(self, path: pathlib.Path):
        files = [path]
        if path.name.endswith(".index.json"):
            files = [path.parent / s for s in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
        self.meta = {}
        for f in files:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, m in header.items():
                self.meta[name] = (f, 8 + n, m)

    def __contains__(self, name):
        return name in self.meta

    def get(self, name, shape):
        f, base, m = self.meta[name]
        if tuple(m["shape"]) != tuple(shape):
            sys.exit(f"{name}: shape {m['shape']} in the file, config.json implies {list(shape)}")
        start = m["data_offsets"][0]
        a = np.memmap(f, dtype=self.DT[m["dtype"]], mode="r", offset=base + start, shape=tuple(shape))
        if m["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a


class TorchExportWeights:
    """The weights of a Llama exported to ONNX by torch (the bundled
    models/target and models/draft): embedding and norms under their module
    names (`m.model.…`, `_fp16` for fp16 tensors), each layer's seven
    projections as anonymous initializers, found in the order the graph
    multiplies by them (q, k, v, o, gate, up, down; stored transposed).
    Bit-exact with the safetensors the export was made from."""

    SLOTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def __init__(self, path: pathlib.Path):
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        made_by = {o: n for n in model.graph.node for o in n.output}
        self.arrays = {}
        for name, t in inits.items():
            if name.startswith("m.model.") and "rot" not in name:
                hf = name[len("m."):].removesuffix("_fp16")
                a = numpy_helper.to_array(t)
                # Norms kept in f32 by the export hold fp16 values: back to f16.
                if a.dtype == np.float32 and np.array_equal(a.astype(np.float16).astype(np.float32), a):
                    a = a.astype(np.float16)
                self.arrays[hf] = a
        projections = []
        for n in model.graph.node:
            if n.op_type not in ("MatMul", "Gemm"):
                continue
            for x in n.input:
                while x not in inits and x in made_by and made_by[x].op_type in ("Cast", "Transpose"):
                    x = made_by[x].input[0]
                if x in inits and not x.startswith("m.") and x not in projections:
                    projections.append(x)
        if len(projections) % len(self.SLOTS):
            sys.exit(f"{path}: {len(projections)} projection weights, not 7 per layer: not a torch-exported Llama")
        for k, name in enumerate(projections):
            layer, slot = divmod(k, len(self.SLOTS))
            a = numpy_helper.to_array(inits[name])
            self.arrays[f"model.layers.{layer}.{self.SLOTS[slot]}.weight"] = np.ascontiguousarray(a.T)

    def __contains__(self, name):
        return name in self.arrays

    def get(self, name, shape):
        a = self.arrays[name]
        if tuple(a.shape) != tuple(shape):
            sys.exit(f"{name}: shape {list(a.shape)} in the ONNX file, config.json implies {list(shape)}")
        return a


class RandomWeights:
    """N(0, std) matrices, ones for norm weights; each tensor seeded by (seed, its name)."""

    def __init__(self, seed, std=0.02):
        self.seed, self.std = seed, std

    def __contains__(self, name):
        return name != "lm_head.weight"  # tied

    def get(self, name, shape):
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(self.std)


def weight_shapes(c):
    """(name, shape) of every matrix and norm, in graph order (lm_head last)."""
    h, d, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    nh, kh = c["num_attention_heads"], c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (nh * d, h)),
                (p + "self_attn.k_proj.weight", (kh * d, h)), (p + "self_attn.v_proj.weight", (kh * d, h)),
                (p + "self_attn.o_proj.weight", (h, nh * d)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


class Graph:
    """Builds the ModelProto in place (no copies of the weights); weights go
    into the proto's raw data or, tensor by tensor, into DATA_FILE."""

    def __init__(self, storage, compute, data_path=None):
        self.S, self.C, self.sdt = TP[storage], TP[compute], NP[storage]
        self.model = helper.make_model(helper.make_graph([], "llama", [], []), producer_name="duo onnx_llama.py",
                                       opset_imports=[helper.make_opsetid("", OPSET)])
        self.model.ir_version = 8  # readable by ONNX Runtime >= 1.10
        self.graph, self.casts, self.n = self.model.graph, {}, 0
        self.data = open(data_path, "wb") if data_path else None
        self.offset = 0

    def op(self, op_type, *inputs, out=None, outs=1, **attrs):
        self.n += 1
        names = [out] if out else [f"{op_type.lower()}_{self.n}_{j}" for j in range(outs)]
        self.graph.node.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type}_{self.n}", **attrs))
        return names[0] if outs == 1 else names

    def const(self, value, dtype):
        self.n += 1
        name = f"const_{self.n}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def i64(self, *v):
        return self.const(list(v), np.int64)

    def weight(self, name, arr):
        """Store arr in the storage dtype under name; returns name."""
        arr = np.ascontiguousarray(arr, dtype=self.sdt)
        t = self.graph.initializer.add(name=name, data_type=self.S, dims=arr.shape)
        if self.data is None:
            t.raw_data = arr.tobytes()
            return name
        self.data.write(b"\0" * (-self.offset % 4096))  # page-aligned: ORT can mmap
        self.offset += -self.offset % 4096
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", self.offset), ("length", arr.nbytes)):
            e = t.external_data.add()
            e.key, e.value = k, str(v)
        self.data.write(arr.data)
        self.offset += arr.nbytes
        return name

    def c(self, x):
        """x (storage dtype) in the compute dtype; one Cast per tensor."""
        if self.S != self.C and x not in self.casts:
            self.casts[x] = self.op("Cast", x, to=self.C)
        return self.casts.get(x, x)

    def s(self, x):
        """x (compute dtype) in the storage dtype."""
        return x if self.S == self.C else self.op("Cast", x, to=self.S)


def untied(c, weights):
    """Whether the LM head is its own matrix (else the embedding's transpose)."""
    if c.get("tie_word_embeddings", False):
        return False
    if "lm_head.weight" not in weights:
        sys.exit("tie_word_embeddings is false but there is no lm_head.weight")
    return True


def inv_freq(c):  # as llama.py computes it, in f32
    d = c["head_dim"]
    return 1.0 / (np.float32(c.get("rope_theta", 10000.0)) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))


def build_graph(c, weights, g: Graph):
    """The decoder; weights come from `weights` one tensor at a time."""
    D, V = c["head_dim"], c["vocab_size"]
    NH, KH, L = c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    R, f32, eps = NH // KH, TensorProto.FLOAT, c.get("rms_norm_eps", 1e-6)
    cdt = np.float32 if g.C == f32 else np.float16
    shapes = dict(weight_shapes(c))

    def w(name):
        return g.weight(name, weights.get(name, shapes[name]))

    def proj(x, name):  # x [N, in] @ W[out, in]^T: HF layout, no transposed copy
        return g.op("Gemm", x, g.c(w(name + ".weight")), transB=1)

    def rmsnorm(x, name):  # statistics in f32 (transformers' LlamaRMSNorm)
        xf = x if g.C == f32 else g.op("Cast", x, to=f32)
        ms = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
        y = g.op("Mul", xf, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32)))))
        y = y if g.C == f32 else g.op("Cast", y, to=g.C)
        return g.op("Mul", g.c(w(name)), y)

    # Dynamic sizes: B, T (new tokens), P (past), S = P + T (keys).
    B = g.op("Shape", "input_ids", start=0, end=1)
    T = g.op("Shape", "input_ids", start=1, end=2)
    P = g.op("Shape", "past_key_values.0.key", start=2, end=3)
    S = g.op("Add", P, T)
    P0, S0, one = g.op("Squeeze", P), g.op("Squeeze", S), g.const(1, np.int64)

    # Additive mask [B, 1, R*T, S]: key k is visible from query t iff k <= P + t
    # (causal) and attention_mask[b, k] != 0. Tiled R times to match the query
    # rows of one KV head's group (see the attention below).
    k_pos = g.op("Range", g.const(0, np.int64), S0, one)
    q_pos = g.op("Unsqueeze", g.op("Range", P0, S0, one), g.i64(1))
    causal = g.op("LessOrEqual", k_pos, q_pos)  # [T, S]
    keep = g.op("Unsqueeze", g.op("Greater", "attention_mask", g.const(0, np.int64)), g.i64(1, 2))  # [B,1,1,S]
    allowed = g.op("And", causal, keep)  # [B, 1, T, S]
    mask = g.op("Where", allowed, g.const(0.0, np.float32), g.const(-1e9, np.float32))
    mask = g.op("Tile", mask, g.i64(1, 1, R, 1))  # f32: softmax runs in f32 for f16 compute too

    # RoPE tables [B, 1, T, D] from position_ids, computed in f32.
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=f32), g.i64(2))  # [B, T, 1]
    freqs = g.op("Mul", pos, g.const(inv_freq(c), np.float32))  # [B, T, D/2]
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos = g.op("Unsqueeze", g.op("Cos", emb), g.i64(1))
    sin = g.op("Unsqueeze", g.op("Sin", emb), g.i64(1))
    if g.C != f32:
        cos, sin = g.op("Cast", cos, to=g.C), g.op("Cast", sin, to=g.C)
    half = g.i64(D // 2, D // 2)

    def rope(x):  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        x1, x2 = g.op("Split", x, half, axis=-1, outs=2)
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))

    split = {n: g.op("Concat", B, T, g.i64(n, D), axis=0) for n in {NH, KH}}

    def heads(x, n):  # [B*T, n*D] -> [B, n, T, D]
        return g.op("Transpose", g.op("Reshape", x, split[n]), perm=[0, 2, 1, 3])

    # The residual stream is 2-D [B*T, H], so every projection is one Gemm.
    embed = w("model.embed_tokens.weight")
    x = g.op("Gather", embed, g.op("Reshape", "input_ids", g.i64(-1)))  # [B*T, H]
    x = x if g.S == g.C else g.op("Cast", x, to=g.C)
    scale = g.const(D ** -0.5, cdt)
    for i in range(L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, p + "input_layernorm.weight")
        q = g.op("Mul", rope(heads(proj(h, p + "self_attn.q_proj"), NH)), scale)
        k = rope(heads(proj(h, p + "self_attn.k_proj"), KH))
        v = heads(proj(h, p + "self_attn.v_proj"), KH)
        k = g.op("Concat", f"past_key_values.{i}.key", g.s(k), axis=2, out=f"present.{i}.key")
        v = g.op("Concat", f"past_key_values.{i}.value", g.s(v), axis=2, out=f"present.{i}.value")
        k, v = g.c(k), g.c(v)  # attend to the cache as stored
        # GQA without copying K/V: query head h = kh * R + r uses KV head kh, so
        # [B, NH, T, D] -> [B, KH, R*T, D] is a plain batched MatMul per KV head.
        qg = g.op("Reshape", q, g.i64(0, KH, -1, D))
        att = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B, KH, R*T, S]
        att = att if g.C == f32 else g.op("Cast", att, to=f32)
        prob = g.op("Softmax", g.op("Add", att, mask), axis=-1)
        prob = prob if g.C == f32 else g.op("Cast", prob, to=g.C)
        o = g.op("Reshape", g.op("MatMul", prob, v), g.i64(0, NH, -1, D))  # [B, NH, T, D]
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.i64(-1, NH * D))
        x = g.op("Add", x, proj(o, p + "self_attn.o_proj"))
        h = rmsnorm(x, p + "post_attention_layernorm.weight")
        gate = proj(h, p + "mlp.gate_proj")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), proj(h, p + "mlp.up_proj"))
        x = g.op("Add", x, proj(act, p + "mlp.down_proj"))
    h = rmsnorm(x, "model.norm.weight")
    head = w("lm_head.weight") if untied(c, weights) else embed
    logits = g.s(g.op("Gemm", h, g.c(head), transB=1))
    g.op("Reshape", logits, g.op("Concat", B, T, g.i64(V), axis=0), out="logits")


def io_specs(c, S):
    L, KH, D, V = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    i64, vi = TensorProto.INT64, helper.make_tensor_value_info
    ins = [vi("input_ids", i64, ["batch_size", "sequence_length"]),
           vi("attention_mask", i64, ["batch_size", "total_sequence_length"]),
           vi("position_ids", i64, ["batch_size", "sequence_length"])]
    outs = [vi("logits", S, ["batch_size", "sequence_length", V])]
    for i in range(L):
        for kind in ("key", "value"):
            ins.append(vi(f"past_key_values.{i}.{kind}", S, ["batch_size", KH, "past_sequence_length", D]))
            outs.append(vi(f"present.{i}.{kind}", S, ["batch_size", KH, "total_sequence_length", D]))
    return ins, outs


def make_config(a):
    """config.json: the source's (--weights) or one for the given shape (--random)."""
    if a.weights:
        c = json.loads((a.weights.parent / "config.json").read_text())
        c.setdefault("num_key_value_heads", c["num_attention_heads"])
        c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    else:
        c = {"vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.ffn,
             "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
             "num_key_value_heads": a.kv_heads or a.heads, "max_position_embeddings": a.context,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "architectures": ["LlamaForCausalLM"],
             "model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": True,
             "attention_bias": False, "mlp_bias": False,
             "head_dim": a.head_dim or a.hidden // a.heads,
             "bos_token_id": a.eos, "eos_token_id": a.eos, "pad_token_id": a.eos, "use_cache": True}
    c["torch_dtype"] = HF_DTYPE[a.dtype]
    bad = [k for k in ("rope_scaling", "attention_bias", "mlp_bias") if c.get(k)]
    if bad or c.get("hidden_act", "silu") != "silu" or c["head_dim"] % 2 \
            or c["num_attention_heads"] % c["num_key_value_heads"]:
        sys.exit(f"unsupported: {bad or 'hidden_act, odd head_dim or heads % kv_heads'}")
    return c


def check(out, c, storage, compute):
    """onnxruntime CPU self-test on batch 2 (row 1 left-padded by 2, row 0 with
    a masked key at 5): incremental decoding (prefill 4, steps, 3-token blocks
    on a past) must match one full prefill, changing the masked token must not
    change row 0, and row 1 must match its unpadded tokens run alone."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # f16 compute: the CPU provider may lack kernels
        print(f"check: ONNX Runtime CPU cannot load this model: {str(e).splitlines()[0][:300]}")
        return compute != "f32"
    L, KH, D, V = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    kv_names = [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    ids = np.random.default_rng(0).integers(1, V, (2, 12))
    am = np.ones((2, 12), np.int64)
    am[1, :2] = am[0, 5] = 0
    pos = np.maximum(np.cumsum(am, 1) - 1, 0)
    valid = np.cumsum(am, 1) > 0  # query rows with at least one visible key

    def run(ids, am, pos, past=None):
        past = past or [np.zeros((len(ids), KH, 0, D), NP[storage])] * (2 * L)
        feed = dict(zip(["input_ids", "attention_mask", "position_ids"], [ids, am, pos]))
        feed.update({f"past_key_values.{n[8:]}": x for n, x in zip(kv_names, past)})
        r = sess.run(["logits"] + kv_names, feed)
        return r[0].astype(np.float32), r[1:]

    t0 = time.time()
    full, full_kv = run(ids, am, pos)
    past, parts = None, []
    for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 9), (9, 10), (10, 12)]:
        logits, past = run(ids[:, lo:hi], am[:, :hi], pos[:, lo:hi], past)
        parts.append(logits)
    diff = float(np.abs(full - np.concatenate(parts, axis=1))[valid].max())
    kv = max(float(np.abs(x.astype(np.float32) - y).transpose(0, 2, 1, 3)[valid].max())
             for x, y in zip(full_kv, past))  # padded rows' K/V come from meaningless states
    other = ids.copy()
    other[0, 5] = other[0, 5] % (V - 1) + 1
    masked = float(np.abs(run(other, am, pos)[0][0] - full[0])[np.arange(12) != 5].max())
    alone = float(np.abs(run(ids[1:, 2:], am[1:, 2:], pos[1:, 2:])[0][0] - full[1, 2:]).max())
    # fp16 logits are rounded to 11 significant bits; another accumulation
    # order (e.g. 1 vs 12 rows per MatMul) may move one by an ulp or two.
    top = float(np.abs(full).max())
    bound = 1e-4 if storage == compute == "f32" else 4 * float(np.spacing(np.float16(top)))
    ok = max(diff, kv, masked, alone) <= bound and np.isfinite(full).all()
    print(f"check ({storage} storage, {compute} compute, CPU, {time.time() - t0:.2f}s): max abs diff, "
          f"incremental vs full: logits {diff:.3g}, KV {kv:.3g}; masked token changed: {masked:.3g}; "
          f"padded row vs alone: {alone:.3g} (bound {bound:.3g}, max |logit| {top:.3g}) -> "
          f"{'OK' if ok else 'FAIL'}")
    return ok


SHAPE = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": None, "ffn": 704,
         "vocab": 2048, "context": 512, "head_dim": None, "eos": 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=pathlib.Path,
                     help="model.safetensors[.index.json], or a torch-exported Llama model.onnx; config.json beside it")
    src.add_argument("--random", action="store_true", help="random weights from --seed")
    for flag, default in SHAPE.items():
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=default, help=f"--random (default {default})")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="storage and I/O dtype")
    ap.add_argument("--compute", choices=["f32", "f16"], help="arithmetic dtype (default: --dtype)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--external", action="store_true", help="weights in model.onnx.data at any size")
    ap.add_argument("--check", action="store_true", help="self-test with onnxruntime (CPU) after building")
    a = ap.parse_args()
    if a.weights and any(getattr(a, k) != v for k, v in SHAPE.items()):
        ap.error("with --weights the shape comes from config.json: drop the shape flags")
    a.compute = a.compute or a.dtype
    t0 = time.time()
    c = make_config(a)
    if a.weights and a.weights.suffix == ".onnx":
        weights = TorchExportWeights(a.weights)
    else:
        weights = SafeTensors(a.weights) if a.weights else RandomWeights(a.seed)
    shapes = [(nm, s) for nm, s in weight_shapes(c)
              if nm in weights and (nm != "lm_head.weight" or untied(c, weights))]
    params = sum(int(np.prod(s)) for _, s in shapes)
    nbytes = params * np.dtype(NP[a.dtype]).itemsize
    external = a.external or nbytes > EXTERNAL_ABOVE
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / DATA_FILE).unlink(missing_ok=True)
    g = Graph(a.dtype, a.compute, a.out / DATA_FILE if external else None)
    build_graph(c, weights, g)
    if g.data:
        g.data.close()
    ins, outs = io_specs(c, TP[a.dtype])
    g.graph.input.extend(ins)
    g.graph.output.extend(outs)
    n_nodes = len(g.graph.node)
    (a.out / "model.onnx").write_bytes(g.model.SerializeToString())
    del g  # free the weights before the checker reads the file back
    onnx.checker.check_model(str(a.out / "model.onnx"))
    (a.out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    if a.weights and (a.weights.parent / "generation_config.json").exists():
        shutil.copy(a.weights.parent / "generation_config.json", a.out / "generation_config.json")
    print(f"wrote {a.out}/model.onnx{' + ' + DATA_FILE if external else ''}: {params:,} parameters, "
          f"{nbytes / 1e6:.1f} MB of {a.dtype} weights, compute {a.compute}, {n_nodes} nodes, "
          f"{time.time() - t0:.1f}s")
    if a.check and not check(a.out, c, a.dtype, a.compute):
        sys.exit(1)


if __name__ == "__main__":
    main()
