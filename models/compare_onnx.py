"""Compare ONNX builds of a model with a reference ONNX export (onnxruntime, CPU).

  python models/compare_onnx.py --ref models/target/model.onnx \
      --fixture models/fixtures/target.json /tmp/t32 /tmp/t16 [...]

For each candidate folder (or model.onnx): max abs logit difference from the
reference on prefills, single steps and 3-token blocks on a past (fixture
token ids); max abs difference from the fixture's PyTorch top-8 logits;
greedy agreement over PROMPTS x NEW tokens (fixture windows, and random ids):
the fraction of positions where the candidate's argmax equals the reference's
greedy token, teacher-forced along the reference's greedy path, and the first
divergence index (mean, min, and how many never diverge) of free-running greedy.
"""

import argparse
import json
import pathlib

import numpy as np
import onnxruntime as ort


class Model:
    def __init__(self, path):
        path = pathlib.Path(path)
        path = path / "model.onnx" if path.is_dir() else path
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        k0 = ins["past_key_values.0.key"]
        self.dtype = np.float16 if "float16" in k0.type else np.float32
        self.L = sum(n.endswith(".key") for n in ins if n.startswith("past_key_values"))
        self.kvh, self.d = k0.shape[1], k0.shape[3]
        if not isinstance(self.kvh, int):  # dynamic in the graph: read config.json
            cfg = json.loads((path.parent / "config.json").read_text())
            self.kvh, self.d = cfg["num_key_value_heads"], cfg["head_dim"]
        self.outs = ["logits"] + [f"present.{i}.{k}" for i in range(self.L) for k in ("key", "value")]

    def __call__(self, ids, past=None):
        """ids: [T] for one sequence continuing `past`; returns (logits [T, V] f32, present)."""
        p = 0 if past is None else past[0].shape[2]
        past = past or [np.zeros((1, self.kvh, 0, self.d), self.dtype)] * (2 * self.L)
        t = len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, p + t), np.int64),
                "position_ids": np.arange(p, p + t, dtype=np.int64)[None]}
        feed.update({f"past_key_values.{n[8:]}": x for n, x in zip(self.outs[1:], past)})
        r = self.sess.run(self.outs, feed)
        return r[0][0].astype(np.float32), r[1:]


def greedy(m, prompt, new):
    logits, past = m(prompt)
    toks = [int(logits[-1].argmax())]
    while len(toks) < new:
        logits, past = m([toks[-1]], past)
        toks.append(int(logits[-1].argmax()))
    return toks


def stepwise(m, seq, start):
    """Logits for seq[start:]: prefill seq[:start], then 1, 1, 3, 1, 3... tokens."""
    logits, past = m(seq[:start])
    out, i, k = [logits[-1:]], start, 0
    while i < len(seq) - 1:
        n = min((1, 1, 3)[k % 3], len(seq) - 1 - i)
        logits, past = m(seq[i:i + n], past)
        out.append(logits)
        i, k = i + n, k + 1
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--fixture", required=True, help="models/fixtures/*.json (token ids, PyTorch top-k)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("cands", nargs="+")
    a = ap.parse_args()
    fx = json.loads(pathlib.Path(a.fixture).read_text())
    V = fx["vocab_size"]
    text = [t for c in fx["cases"] if c["name"].startswith("prefill") for t in c["input"]]
    stride = max(1, (len(text) - 32) // (a.prompts - 1))
    rng = np.random.default_rng(0)
    prompt_sets = {
        "fixture-text": [text[i * stride:i * stride + 32] for i in range(a.prompts)],
        "random-ids": [list(rng.integers(1, V, 32)) for _ in range(a.prompts)],
    }
    ref = Model(a.ref)
    ref_greedy = {k: [greedy(ref, p, a.new) for p in ps] for k, ps in prompt_sets.items()}
    models = [("ref", ref)] + [(c, Model(c)) for c in a.cands]
    results = {}
    for name, m in models:
        r = {}
        # PyTorch top-k reference values from the fixture.
        worst = 0.0
        for c in fx["cases"]:
            if c["past"]:
                _, past = m(c["past"])
                logits, _ = m(c["input"], past)
            else:
                logits, _ = m(c["input"])
            worst = max(worst, float(np.abs(np.take_along_axis(logits, np.array(c["top_ids"]), 1)
                                            - np.array(c["top_values"])).max()))
        r["vs_pytorch_topk_max_abs"] = worst
        if m is not ref:
            diffs = []
            for ps, gs in zip(prompt_sets["fixture-text"], ref_greedy["fixture-text"]):
                seq = ps + gs
                diffs.append(np.abs(m(seq)[0] - ref(seq)[0]).max())  # prefill
                diffs.append(np.abs(stepwise(m, seq, len(ps)) - stepwise(ref, seq, len(ps))).max())
            r["vs_ref_logits_max_abs"] = float(max(diffs))
            for key, ps in prompt_sets.items():
                agree, first = [], []
                for p, g in zip(ps, ref_greedy[key]):
                    tf = m(p + g[:-1])[0][len(p) - 1:].argmax(-1)  # teacher-forced
                    agree.append((tf == np.array(g)).mean())
                    own = greedy(m, p, a.new)
                    first.append(next((i for i, (x, y) in enumerate(zip(own, g)) if x != y), a.new))
                r[key] = {"teacher_forced_agreement": float(np.mean(agree)),
                          "first_divergence_mean": float(np.mean(first)),
                          "first_divergence_min": int(min(first)),
                          "never_diverged": f"{sum(f == a.new for f in first)}/{len(first)}"}
        results[name] = r
        print(name, json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
