"""Training: the target on the corpus, then the draft distilled from it."""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .llama import Llama


def batches(data: np.ndarray, batch: int, seq: int, gen: torch.Generator):
    """Endless random windows of seq+1 tokens from the token stream."""
    n = len(data) - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen).numpy()
        x = np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x)


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


@torch.no_grad()
def val_loss(model, val: np.ndarray, seq: int, n: int = 16):
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    xb = next(batches(val, n, seq, gen))
    logits = model(xb[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1))
    model.train()
    return loss.item()


def train_lm(model: Llama, data, val, *, steps, batch, seq, lr, seed, log, teacher=None, extra=None, kl_weight=0.7):
    """Trains `model`. With `teacher`, the loss is kl_weight*KL(teacher||model) + (1-kl_weight)*CE;
    `extra` (a token array of teacher-generated sequences, shape [n, len]) is mixed into half the batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    it = batches(data, batch, seq, gen)
    warmup = max(1, steps // 20)
    t0 = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        if extra is not None and step % 2 == 1:
            idx = torch.randint(0, extra.shape[0], (batch * seq // extra.shape[1],), generator=gen)
            xb = torch.from_numpy(extra[idx.numpy()].astype(np.int64))
        else:
            xb = next(it)
        x, y = xb[:, :-1], xb[:, 1:]
        logits = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                tlogp = F.log_softmax(teacher(x), dim=-1)
            logp = F.log_softmax(logits, dim=-1)
            kl = F.kl_div(logp, tlogp, log_target=True, reduction="batchmean") / x.shape[1]
            loss = kl_weight * kl + (1 - kl_weight) * ce
        else:
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            tps = (step + 1) * batch * seq / max(el, 1e-9)
            log(f"step {step}/{steps} loss {loss.item():.3f} ce {ce.item():.3f} lr {opt.param_groups[0]['lr']:.2e} {tps:.0f} tok/s {el/60:.1f} min")
    model.eval()
    return time.time() - t0


@torch.no_grad()
def greedy(model: Llama, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts [b, t] with the KV forward. Returns [b, t+new]."""
    s = model.shape
    b, t = prompts.shape
    past = [torch.zeros(b, s.num_key_value_heads, 0, s.head_dim) for _ in range(2 * s.num_hidden_layers)]
    ids = prompts
    out = prompts
    pos = torch.arange(t)[None].expand(b, t)
    for _ in range(new_tokens):
        total = past[0].shape[2] + ids.shape[1]
        mask = torch.ones(b, total, dtype=torch.int64)
        logits, past = model.forward_kv(ids, mask, pos, past)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        ids = nxt
        pos = torch.full((b, 1), total, dtype=torch.int64)
    return out
