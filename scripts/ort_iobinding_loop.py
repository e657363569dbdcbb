"""The reference the Rust runtime is measured against: a plain Python
onnxruntime loop with IOBinding, as a Python serving stack would write it.

For each context length: prefill that many tokens once, keep the cache on the
device (present outputs bound to device memory), then time forwards of 1 and
8 new tokens on that fixed past (logits bound to host memory). Prints one
JSON object: {"contexts": {"128": {"+1_ms": ..., "+8_ms": ...}, ...}, ...}.

usage: ort_iobinding_loop.py MODEL_DIR --device cpu|cuda --contexts 128,1024
       [--reps 30] [--threads 1]
"""

import argparse
import json
import pathlib
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="128")
    ap.add_argument("--blocks", default="1,8")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    path = pathlib.Path(a.model)
    if path.is_dir():
        path = path / "model.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider"] if a.device.startswith("cuda") else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise SystemExit(f"{providers[0]} unavailable (got {sess.get_providers()})")
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    past0 = next(i for i in sess.get_inputs() if i.name == past_names[0])
    kv_dtype = np.float16 if "float16" in past0.type else np.float32
    heads, head_dim = past0.shape[1], past0.shape[3]
    has_pos = any(i.name == "position_ids" for i in sess.get_inputs())

    def forward(past, start, n):
        """One forward of n tokens after `start` cached positions; returns
        the present values (left on the device)."""
        b = sess.io_binding()
        b.bind_cpu_input("input_ids", np.full((1, n), 7, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, start + n), dtype=np.int64))
        if has_pos:
            b.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None, :])
        for name, v in zip(past_names, past):
            b.bind_ortvalue_input(name, v)
        b.bind_output("logits", "cpu")
        for name in present_names:
            b.bind_output(name, dev)
        sess.run_with_iobinding(b)
        outs = b.get_outputs()
        outs[0].numpy()  # the logits reach host memory
        return outs[1:]

    empty = np.zeros((1, heads, 0, head_dim), dtype=kv_dtype)
    result = {"device": dev, "provider": sess.get_providers()[0], "contexts": {}}
    for ctx in [int(c) for c in a.contexts.split(",")]:
        past = [ort.OrtValue.ortvalue_from_numpy(empty, dev) for _ in past_names]
        past = forward(past, 0, ctx)
        row = {}
        for n in [int(x) for x in a.blocks.split(",")]:
            for _ in range(3):
                forward(past, ctx, n)
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                forward(past, ctx, n)
                times.append((time.perf_counter() - t) * 1e3)
            row[f"+{n}_ms"] = statistics.median(times)
        result["contexts"][str(ctx)] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
