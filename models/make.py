"""Makes the bundled draft/target pair from nothing: corpus -> tokenizer ->
target -> distilled draft -> ONNX + HF checkpoints -> fixtures -> measurements.

    python models/make.py            # everything (CPU, fixed seed)
    python models/make.py --device cuda --scale 3   # longer training on a GPU

Intermediate state lives in models/.work/ (ignored by git); stages whose
output exists are skipped, `--fresh` starts over.
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from duomodels import corpus, tok as toklib, train as trainlib  # noqa: E402
from duomodels.llama import Llama, LlamaShape, count_params  # noqa: E402

VOCAB = 2048
CONTEXT = 512
TARGET = LlamaShape(VOCAB, 256, 704, 4, 8, 2, CONTEXT)
DRAFT = LlamaShape(VOCAB, 128, 384, 1, 4, 4, CONTEXT)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-steps", type=int, default=1200)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply training steps (e.g. on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--until", default="all", choices=["target", "draft", "all"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = HERE / ".work"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}

    # 1. Corpus and tokenizer.
    train_docs, held_docs = corpus.load(work / "corpus")
    tok_path = HERE / "tokenizer.json"
    if not (work / "train.npy").exists():
        t0 = time.time()
        tk = toklib.train(train_docs, VOCAB)
        tk.save(str(tok_path))
        eot = tk.token_to_id(corpus.EOT)
        enc = lambda docs: np.concatenate([np.array(tk.encode(d).ids + [eot], dtype=np.int16) for d in docs])
        tr, va = enc(train_docs), enc(held_docs)
        np.save(work / "train.npy", tr)
        np.save(work / "val.npy", va)
        chars = sum(len(d) for d in train_docs)
        timings["tokenizer_s"] = time.time() - t0
        timings["train_tokens"] = int(len(tr))
        timings["val_tokens"] = int(len(va))
        timings["chars_per_token"] = chars / len(tr)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
        log(f"tokenizer: {len(tr)} train tokens, {len(va)} held-out, {chars/len(tr):.2f} chars/token")
    tr, va = np.load(work / "train.npy"), np.load(work / "val.npy")

    # 2. Target.
    torch.manual_seed(args.seed)
    target = Llama(TARGET)
    if (work / "target.pt").exists():
        target.load_state_dict(torch.load(work / "target.pt"))
    else:
        log(f"target: {count_params(target)} params")
        secs = trainlib.train_lm(target, tr, va, steps=int(args.target_steps * args.scale), batch=16, seq=CONTEXT,
                                 lr=2e-3, seed=args.seed, log=log)
        torch.save(target.state_dict(), work / "target.pt")
        timings["target_train_s"] = secs
        timings["target_val_loss"] = trainlib.val_loss(target, va, CONTEXT)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
        log(f"target val loss {timings['target_val_loss']:.3f} after {secs/60:.1f} min")
    target.eval()
    if args.until == "target":
        return

    # 3. Teacher-generated sequences: greedy continuations of training windows,
    #    the very distribution the draft must predict during decoding.
    if not (work / "samples.npy").exists():
        t0 = time.time()
        gen = torch.Generator().manual_seed(args.seed + 1)
        seqs = []
        for _ in range(24):
            prompts = next(trainlib.batches(tr, 64, 63, gen))
            seqs.append(trainlib.greedy(target, prompts, 128).numpy().astype(np.int16))
        np.save(work / "samples.npy", np.concatenate(seqs))
        timings["samples_s"] = time.time() - t0
        log(f"teacher samples: {timings['samples_s']:.0f} s")
    samples = np.load(work / "samples.npy")

    # 4. Draft, distilled.
    torch.manual_seed(args.seed + 2)
    draft = Llama(DRAFT)
    if (work / "draft.pt").exists():
        draft.load_state_dict(torch.load(work / "draft.pt"))
    else:
        log(f"draft: {count_params(draft)} params")
        for p in target.parameters():
            p.requires_grad_(False)
        secs = trainlib.train_lm(draft, tr, va, steps=int(args.draft_steps * args.scale), batch=16, seq=256,
                                 lr=3e-3, seed=args.seed + 3, log=log, teacher=target, extra=samples)
        torch.save(draft.state_dict(), work / "draft.pt")
        timings["draft_train_s"] = secs
        timings["draft_val_loss"] = trainlib.val_loss(draft, va, CONTEXT)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
        log(f"draft val loss {timings['draft_val_loss']:.3f} after {secs/60:.1f} min")
    draft.eval()
    if args.until == "draft":
        return

    from duomodels import publish
    publish.run(HERE, work, target, draft, held_docs, timings, log)


if __name__ == "__main__":
    main()
