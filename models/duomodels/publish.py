"""Publishing: HF checkpoints, ONNX exports, parity checks, Rust fixtures,
measurements and the model card.

The shipped model *is* the fp16-rounded weights: the safetensors store them
in fp16, the ONNX graphs store them in fp16 with a Cast to fp32, and every
PyTorch reference here runs the same rounded weights in fp32.
"""

import json
import pathlib
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import export as exportlib
from .corpus import EOT
from .llama import Llama, count_params
from .train import greedy

TOPK = 8


def round_fp16(model: Llama) -> Llama:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def save_hf(model: Llama, folder: pathlib.Path, eos: int):
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.shape.hf_config(eos), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, indent=2) + "\n"
    )


def check_transformers(model: Llama, folder: pathlib.Path, ids: torch.Tensor) -> float:
    """Loads the saved checkpoint with transformers; returns max |logit diff| vs our module."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        a = hf(ids).logits
        b = model(ids)
    return float((a - b).abs().max())


def ort_session(path: pathlib.Path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_forward(sess, model: Llama, past_ids, new_ids, past_kv=None):
    """Runs new_ids after past (given as KV from a previous call, or empty)."""
    s = model.shape
    b = 1
    if past_kv is None:
        past_kv = [np.zeros((b, s.num_key_value_heads, 0, s.head_dim), np.float32) for _ in range(2 * s.num_hidden_layers)]
    p = past_kv[0].shape[2]
    t = len(new_ids)
    feeds = {
        "input_ids": np.array([new_ids], np.int64),
        "attention_mask": np.ones((b, p + t), np.int64),
        "position_ids": np.arange(p, p + t, dtype=np.int64)[None],
    }
    for i in range(s.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = past_kv[2 * i]
        feeds[f"past_key_values.{i}.value"] = past_kv[2 * i + 1]
    out = sess.run(None, feeds)
    return out[0][0], out[1:]


def torch_logits(model: Llama, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def top(logits_row, k=TOPK):
    idx = np.argsort(-logits_row, kind="stable")[:k]
    return [int(i) for i in idx], [float(logits_row[i]) for i in idx]


def parity_and_fixture(name, model, sess, prompts_ids):
    """Compares ORT with PyTorch on prefill, single steps and 3/8-token blocks
    on a past; returns (max_abs_diff, argmax_equal, fixture_cases)."""
    cases, max_diff, argmax_ok = [], 0.0, True
    for pi, ids in enumerate(prompts_ids[:3]):
        ref_full = torch_logits(model, ids)
        splits = [("prefill", 0, len(ids)), ("step", len(ids) - 1, len(ids)), ("block3", len(ids) - 3, len(ids)),
                  ("block8", len(ids) - 8, len(ids))]
        for case, a, bnd in splits:
            kv = None
            if a > 0:
                _, kv = ort_forward(sess, model, [], ids[:a])
            got, _ = ort_forward(sess, model, ids[:a], ids[a:bnd], kv)
            ref = ref_full[a:bnd]
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            argmax_ok &= bool((got.argmax(-1) == ref.argmax(-1)).all())
            tops = [top(r) for r in ref]
            cases.append({
                "name": f"{case}-{pi}", "past": [int(x) for x in ids[:a]], "input": [int(x) for x in ids[a:bnd]],
                "top_ids": [t[0] for t in tops], "top_values": [t[1] for t in tops],
            })
    return max_diff, argmax_ok, cases


def time_forwards(pairs, past_len=128, reps=1500):
    """Median forward times (ms) at a past of `past_len`, for +1/+4/+8 tokens
    and a 128-token prefill. `pairs` is [(name, session, model)]; the models
    are timed in alternation so machine noise hits them alike, through an
    IOBinding prepared once, so Python's per-call overhead stays out of the
    model's cost as far as the Python API allows."""
    out = {name: {} for name, _, _ in pairs}

    def binding(sess, model, t, past):
        s = model.shape
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", np.ones((1, t), np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, past + t), np.int64))
        io.bind_cpu_input("position_ids", np.arange(past, past + t, dtype=np.int64)[None])
        for i in range(s.num_hidden_layers):
            for kv in ("key", "value"):
                v = (np.random.randn(1, s.num_key_value_heads, past, s.head_dim) * 0.1).astype(np.float32)
                io.bind_cpu_input(f"past_key_values.{i}.{kv}", v)
        for o in sess.get_outputs():
            io.bind_output(o.name)
        return io

    for label, t, past, n in (("+1", 1, past_len, reps), ("+4", 4, past_len, reps), ("+8", 8, past_len, reps),
                              (f"prefill{past_len}", past_len, 0, 100)):
        prepared = [(name, sess, binding(sess, model, t, past)) for name, sess, model in pairs]
        times = {name: [] for name, _, _ in pairs}
        for i in range(n + 20):
            for name, sess, io in prepared:
                a = time.perf_counter()
                sess.run_with_iobinding(io)
                if i >= 20:
                    times[name].append(time.perf_counter() - a)
        for name in times:
            out[name][label] = float(np.median(times[name]) * 1e3)
    return out


def python_ar_tokens_per_s(sess, model: Llama, prompt, new=128, reps=10):
    best = 0.0
    for _ in range(reps):
        a = time.perf_counter()
        logits, kv = ort_forward(sess, model, [], prompt)
        tok = int(logits[-1].argmax())
        for _ in range(new - 1):
            logits, kv = ort_forward(sess, model, None, [tok], kv)
            tok = int(logits[-1].argmax())
        best = max(best, new / (time.perf_counter() - a))
    return best


def agreement(target: Llama, draft: Llama, prompts, new=64):
    """Teacher-forced along the target's greedy continuation: fraction of
    positions where the draft's argmax equals the target's greedy token."""
    hits = total = 0
    conts = []
    for ids in prompts:
        seq = greedy(target, torch.tensor([ids]), new)
        conts.append(seq[0, len(ids):].tolist())
        with torch.no_grad():
            dl = draft(seq[:, :-1])[0, len(ids) - 1:]
        want = seq[0, len(ids):]
        hits += int((dl.argmax(-1) == want).sum())
        total += len(want)
    return hits / total, conts


def run(here: pathlib.Path, work: pathlib.Path, target: Llama, draft: Llama, held_docs, timings, log):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(here / "tokenizer.json"))
    eos = tk.token_to_id(EOT)
    round_fp16(target)
    round_fp16(draft)
    results = {"timings": timings}

    # Prompts from the held-out works: line-aligned windows.
    rng = np.random.default_rng(7)
    lines = [ln for doc in held_docs for ln in doc.split("\n")]
    prompts_text = []
    while len(prompts_text) < 60:
        i = int(rng.integers(0, len(lines) - 8))
        text = "\n".join(lines[i:i + 6]).strip()
        if 80 <= len(text) <= 400:
            prompts_text.append(text + "\n")
    prompts_ids = [tk.encode(t).ids for t in prompts_text]

    sessions = {}
    for name, model in (("target", target), ("draft", draft)):
        folder = here / name
        t0 = time.time()
        save_hf(model, folder, eos)
        exportlib.export(model, folder / "model.onnx")
        log(f"{name}: exported in {time.time() - t0:.0f} s")
        sess = ort_session(folder / "model.onnx")
        hf_diff = check_transformers(model, folder, torch.tensor([prompts_ids[0]]))
        max_diff, argmax_ok, cases = parity_and_fixture(name, model, sess, prompts_ids)
        log(f"{name}: ORT vs PyTorch max |diff| {max_diff:.2e}, argmax equal {argmax_ok}; transformers vs ours {hf_diff:.2e}")
        # Greedy continuations for the Rust tests, with the top-2 gap per step.
        greedy_fx = []
        for ids in prompts_ids[:3]:
            seq = greedy(model, torch.tensor([ids]), 32)[0].tolist()
            logits = torch_logits(model, seq[:-1])[len(ids) - 1:]
            srt = np.sort(logits, axis=-1)
            greedy_fx.append({"prompt": tk.decode(ids), "ids": ids, "greedy": seq[len(ids):],
                              "top2_gap": [float(g) for g in (srt[:, -1] - srt[:, -2])]})
        fixture = {"model": name, "vocab_size": model.shape.vocab_size, "eos_token_id": eos, "topk": TOPK,
                   "tolerance": 1e-3, "cases": cases, "greedy": greedy_fx}
        (here / "fixtures").mkdir(exist_ok=True)
        (here / "fixtures" / f"{name}.json").write_text(json.dumps(fixture) + "\n")
        sessions[name] = (sess, model)
        results[name] = {
            "params": count_params(model),
            "shape": model.shape.hf_config(eos),
            "ort_vs_torch_max_abs_diff": max_diff,
            "ort_vs_torch_argmax_equal": argmax_ok,
            "transformers_vs_module_max_abs_diff": hf_diff,
            "python_ort_ar_tokens_per_s": python_ar_tokens_per_s(sess, model, prompts_ids[0]),
            "onnx_bytes": (folder / "model.onnx").stat().st_size,
            "safetensors_bytes": (folder / "model.safetensors").stat().st_size,
        }
        log(f"{name}: python AR {results[name]['python_ort_ar_tokens_per_s']:.0f} tok/s")

    # A model that is not a causal LM with a KV cache, for the runtime's error test.
    import onnx
    from onnx import helper, TensorProto
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "not_a_causal_lm",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 18)]), str(here / "fixtures" / "not_a_causal_lm.onnx"))

    costs = time_forwards([(n, sessions[n][0], sessions[n][1]) for n in ("target", "draft")])
    for n in costs:
        results[n]["ort_ms_1thread_past128"] = costs[n]
        log(f"{n}: forward ms {costs[n]}")

    agree, conts = agreement(target, draft, prompts_ids[:60], new=64)
    t, d = results["target"]["ort_ms_1thread_past128"], results["draft"]["ort_ms_1thread_past128"]
    results["bar"] = {
        "greedy_agreement": agree,
        "agreement_prompts": len(prompts_ids[:60]),
        "agreement_new_tokens": 64,
        "target_over_draft_cost_1token": t["+1"] / d["+1"],
        "target_8_over_1": t["+8"] / t["+1"],
        "max_ort_vs_torch": max(results["target"]["ort_vs_torch_max_abs_diff"], results["draft"]["ort_vs_torch_max_abs_diff"]),
        "committed_bytes": sum(p.stat().st_size for p in here.rglob("*") if p.suffix in (".onnx", ".safetensors")) +
                           (here / "tokenizer.json").stat().st_size,
    }
    results["samples"] = [{"prompt": prompts_text[i], "target_greedy": tk.decode(conts[i])} for i in range(3)]
    results["val_perplexity"] = {"target": float(np.exp(timings.get("target_val_loss", 0))),
                                 "draft": float(np.exp(timings.get("draft_val_loss", 0)))}
    import platform
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.machine())
    import os
    results["machine"] = f"{cpu}, {os.cpu_count()} cores"
    (here / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"bar: {json.dumps(results['bar'])}")
    from . import card
    card.render(here)
