"""A minimal Llama decoder (RMSNorm, RoPE, SiLU MLP, GQA, tied embeddings).

Parameter names and numerics match Hugging Face `LlamaForCausalLM`, so a
checkpoint saved from this module loads in `transformers` unchanged (the
pipeline checks that). Owning the module keeps the exported ONNX graph small:
one mask, one rotary table, plain MatMuls.
"""

from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self, eos_token_id: int) -> dict:
        """The Hugging Face `config.json` for this shape."""
        cfg = asdict(self)
        cfg.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            head_dim=self.head_dim,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            torch_dtype="float16",
            use_cache=True,
        )
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.h, self.kvh, self.d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, self.kvh * self.d, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, self.kvh * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, s.hidden_size, bias=False)
        # rotate_half as a matrix (exact: entries are 0 and +-1), one MatMul in ONNX.
        half = self.d // 2
        rot = torch.zeros(self.d, self.d)
        rot[torch.arange(half) + half, torch.arange(half)] = -1.0
        rot[torch.arange(half), torch.arange(half) + half] = 1.0
        self.register_buffer("rot", rot, persistent=False)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        if mask is None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        else:
            q = q * cos + (q @ self.rot) * sin
            k = k * cos + (k @ self.rot) * sin
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        present = (k, v)
        rep = self.h // self.kvh
        if mask is None:
            # Training: fused causal attention.
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        else:
            # Inference/export: grouped-query attention by broadcasting the
            # query groups against each KV head (no copy of K/V).
            qg = q.reshape(b, self.kvh, rep, t, self.d)
            att = (qg @ k[:, :, None].transpose(-1, -2)) * (self.d ** -0.5) + mask[:, :, None]
            out = (torch.softmax(att, dim=-1) @ v[:, :, None]).reshape(b, self.h, t, self.d)
        out = out.transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.o_proj(out), present


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Body(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class Llama(nn.Module):
    """`LlamaForCausalLM`-compatible module (tied LM head)."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.shape = s
        self.model = Body(s)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def rope(self, position_ids):
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [b, t, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, t, d]
        return emb.cos(), emb.sin()

    def logits(self, h):
        return h @ self.model.embed_tokens.weight.t()

    def forward(self, input_ids):
        """Training forward: full causal attention, positions 0..t-1."""
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        cos, sin = self.rope(pos)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, None)
        return self.logits(self.model.norm(x))

    def forward_kv(self, input_ids, attention_mask, position_ids, past):
        """Inference forward in the Optimum convention.

        `past` is a flat list [k0, v0, k1, v1, ...] each [b, kv_heads, past, head_dim];
        `attention_mask` is [b, past + t] (1 = attend). Returns logits and the
        flat list of present keys/values (past + new).
        """
        b, t = input_ids.shape
        past_len = past[0].shape[2]
        total = past_len + t
        cos, sin = self.rope(position_ids)
        q_pos = torch.arange(t, device=input_ids.device)[:, None] + past_len
        k_pos = torch.arange(total, device=input_ids.device)[None, :]
        allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), -1e9, dtype=torch.float32))
        x = self.model.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, (k, v) = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return self.logits(self.model.norm(x)), presents


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
