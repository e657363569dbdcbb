#!/usr/bin/env python3
"""Build the "bring your own model" fixtures: tiny random Hugging Face models
exported with Optimum, one folder per model under models/fixtures/byom/.

Each folder holds what a user's export folder holds:
  model.onnx (+ model.onnx_data), config.json, generation_config.json,
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
plus reference.json (made here from transformers, the PyTorch fp32 model):
  prompts: prompt, prompt_ids (= AutoTokenizer(folder)(prompt)["input_ids"]),
           generated_ids (model.generate(do_sample=False, max_new_tokens=12),
           eos stopping as transformers applies it: generation_config eos list)
  chat:    messages, rendered (apply_chat_template(..., tokenize=False,
           add_generation_prompt=True)) and ids (the same with tokenize=True)

The ONNX graphs are Optimum's `text-generation-with-past` exports (inputs
input_ids, attention_mask, [position_ids], past_key_values.{i}.key|value;
outputs logits, present.{i}.key|value). The script then checks that
onnxruntime greedy decoding of each exported folder (prefill, then one token at
a time on the past) gives transformers' tokens, and that the bare
tokenizer.json (what a non-Python runtime reads) gives AutoTokenizer's ids.

No hub is reachable, so the tokenizers are trained here (BPE, ~460-510 tokens)
on the English text below, in two styles:
  sentencepiece-like (llama, mistral, phi3): "▁" normalizer, byte fallback,
    <unk>/<s>/</s> = 0/1/2; llama and mistral add <s> (post-processor), phi3 not
  byte-level (qwen2, gpt2): GPT-2 bytes-to-unicode BPE; no BOS added

Environment (a venv of its own; see models/README.md; accelerate lets
Optimum de-duplicate tied embeddings, as users' exports are):
  python3 -m venv /tmp/optenv
  /tmp/optenv/bin/pip install torch "transformers<4.58" optimum-onnx==0.1.0 \
      onnx onnxruntime tokenizers jinja2 accelerate
  /tmp/optenv/bin/python models/make_byom_fixtures.py [--only NAME ...] [--work DIR]

Exit status 1 if any model failed or ORT disagreed with transformers.
"""

import argparse
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "byom"

MAX_NEW_TOKENS = 12
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, there was a little robot who",
    "What is the capital of France?",
]
# A 4th prompt for two models, found by trying prompts on these seeds: greedy
# decoding stops early on an eos id (llama: <|eot_id|>, the 2nd id of its
# generation_config eos list; qwen2: <|im_end|>), to test eos-list stopping.
EOS_PROMPT = {
    "llama": "Who has smoked the most cigarettes in the world?",
    "qwen2": "King green river",
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colors."},
    ],
    [
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": "I am a small model."},
        {"role": "user", "content": "Tell me a short story."},
    ],
]
BAD_ORDER = [
    {"role": "user", "content": "Hi."},
    {"role": "user", "content": "Hi again."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
]
FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# --------------------------------------------------------------------------
# Training text for the tokenizers (fixed, English, no download).

BASE_TEXT = """\
The quick brown fox jumps over the lazy dog.
Once upon a time, there was a little robot who wanted to see the sea.
What is the capital of France? The capital of France is Paris.
The sun rises in the east and sets in the west.
She opened the window and the cold morning air came into the room.
A good story has a beginning, a middle and an end.
He asked the teacher a question about the history of the city.
Water boils at one hundred degrees at sea level.
The children played in the garden until it was time for dinner.
Please tell me a short story about a cat and a dog.
You are a helpful assistant. Answer the question in one sentence.
The model reads the text one token at a time and predicts the next one.
Summarize the following article in three sentences.
Translate the sentence into German: the house is small and old.
How many days are there in a year? There are three hundred and sixty five.
The train to London leaves at nine in the morning from the main station.
My favourite colors are red, green and blue.
They walked along the river and talked about their plans for the summer.
If you have any questions, please let me know.
The weather today is sunny with a light wind from the north.
"""

SUBJECTS = ["The robot", "A little girl", "My friend", "The old man", "The teacher",
            "A small dog", "The cat", "Our team", "The writer", "The farmer"]
VERBS = ["wanted to see", "walked to", "talked about", "wrote a story about",
         "asked a question about", "looked at", "found", "remembered", "painted", "visited"]
OBJECTS = ["the sea", "the city", "the garden", "the river", "the old house",
           "the capital of France", "the morning train", "a blue box", "the summer", "the market"]
TAILS = [".", " today.", " in the morning.", " with a smile.", " again and again.",
         " before dinner.", "?", "!", " for a long time.", " and then went home."]


def corpus():
    rng = random.Random(1234)
    lines = BASE_TEXT.strip().split("\n")
    for _ in range(600):
        lines.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}")
    return lines


# --------------------------------------------------------------------------
# Chat templates (modelled on the real ones).

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user, assistant and system roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_TOOL_TEMPLATE = (
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{%- if tools %}"
    "{{- '\n\n# Tools\n\nYou may call one or more functions.\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\nReturn a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{%- if message['role'] not in ['user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# --------------------------------------------------------------------------
# Tokenizers.


def train_sp_style(lines):
    """Llama-2-style tokenizer.json: "▁" normalizer, no pre-tokenizer, BPE with
    byte fallback; <unk> <s> </s> = 0 1 2, <0x00>..<0xFF> = 3..258."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # merges never cross a word start (as sentencepiece's split_by_whitespace)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=250, special_tokens=specials, show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    out.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return out


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_byte_level(lines, style):
    """GPT-2 byte-level BPE (256 byte symbols + ~200 merges); style 'gpt2' or 'qwen2'."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(vocab_size=456, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if style == "gpt2":
        out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        out.post_processor = processors.ByteLevel(trim_offsets=True)
    else:
        out.normalizer = normalizers.NFC()
        out.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        out.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    out.decoder = decoders.ByteLevel()
    return out


def special(content):
    from tokenizers import AddedToken

    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


def make_tokenizer(family, lines, context):
    """A transformers fast tokenizer with the family's special tokens and rules."""
    from transformers import GPT2TokenizerFast, LlamaTokenizerFast, Qwen2TokenizerFast

    if family in ("llama", "mistral", "phi3"):
        backend = train_sp_style(lines)
        extra = {
            "llama": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "mistral": [],
            "phi3": ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        }[family]
        backend.add_special_tokens([special(t) for t in ["<unk>", "<s>", "</s>"] + extra])
        kw = dict(
            tokenizer_object=backend,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            add_bos_token=family != "phi3",  # Phi-3's tokenizer adds no BOS
            add_eos_token=False,
            legacy=False,
            model_max_length=context,
            clean_up_tokenization_spaces=False,
        )
        if family == "phi3":
            kw.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok = LlamaTokenizerFast(**kw)
        tok.chat_template = {"llama": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "phi3": PHI3_TEMPLATE}[family]
        return tok
    backend = train_byte_level(lines, family)
    if family == "gpt2":
        backend.add_special_tokens([special("<|endoftext|>")])
        return GPT2TokenizerFast(
            tokenizer_object=backend,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            add_prefix_space=False,
            model_max_length=context,
        )
    backend.add_special_tokens([special(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=context,
        clean_up_tokenization_spaces=False,
    )
    # named templates, saved as [{"name": "default", ...}, {"name": "tool_use", ...}]
    tok.chat_template = {"default": CHATML_TEMPLATE, "tool_use": CHATML_TOOL_TEMPLATE}
    return tok


def save_tokenizer(tok, folder):
    tok.save_pretrained(str(folder), save_jinja_files=False)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("chat_template"), dict):  # not expected; keep the list form
        cfg["chat_template"] = [{"name": k, "template": v} for k, v in cfg["chat_template"].items()]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Models.


def specs():
    """name -> how to build it. 'base' reuses another entry's HF model."""
    return {
        # seed 3: wide top-2 logit gaps on PROMPTS, so the fp16 export agrees too
        "llama": dict(family="llama", arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, tied=True,
                      seed=3, extra_prompts=[EOS_PROMPT["llama"]]),
        "llama-draft": dict(family="llama", arch="llama", hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, tied=True, seed=2),
        "llama-draft-padded": dict(family="llama", arch="llama", hidden=32, layers=1, heads=2, kv_heads=1, ffn=64,
                                   tied=True, seed=11, pad_vocab=True),
        "llama-fp16": dict(base="llama", variant="fp16"),
        "llama-external": dict(base="llama", variant="external"),
        "qwen2": dict(family="qwen2", arch="qwen2", hidden=48, layers=2, heads=4, kv_heads=2, ffn=96, tied=True, seed=4,
                      extra_prompts=[EOS_PROMPT["qwen2"]]),
        "mistral": dict(family="mistral", arch="mistral", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, tied=False, seed=13),
        "phi3": dict(family="phi3", arch="phi3", hidden=32, layers=2, heads=4, kv_heads=4, ffn=64, tied=False, seed=6),
        "gpt2": dict(family="gpt2", arch="gpt2", hidden=48, layers=2, heads=4, kv_heads=4, ffn=96, tied=True, seed=7),
    }


CONTEXT = 128
INIT_RANGE = 0.2  # larger than the usual 0.02 so greedy top-2 logit gaps are wide (fp16 must agree too)


def eos_ids(family, tok):
    t = tok.convert_tokens_to_ids
    return {
        "llama": [t("</s>"), t("<|eot_id|>")],
        "mistral": [t("</s>")],
        "phi3": [t("<|endoftext|>"), t("<|end|>")],
        "qwen2": [t("<|im_end|>"), t("<|endoftext|>")],
        "gpt2": [t("<|endoftext|>")],
    }[family]


def hf_config(spec, tok, vocab_size):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    fam = spec["family"]
    eos = eos_ids(fam, tok)
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos[-1]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec["hidden"],
        intermediate_size=spec["ffn"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=CONTEXT,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=spec["tied"],
        bos_token_id=bos,
        eos_token_id=eos[0],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    if fam == "llama":
        return LlamaConfig(**common, hidden_act="silu")
    if fam == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if fam == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False, sliding_window=None)
    if fam == "phi3":
        return Phi3Config(**common, pad_token_id=tok.pad_token_id, original_max_position_embeddings=CONTEXT,
                          rope_scaling=None, sliding_window=None)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=CONTEXT, n_embd=spec["hidden"], n_layer=spec["layers"],
        n_head=spec["heads"], n_inner=spec["ffn"], initializer_range=INIT_RANGE,
        bos_token_id=bos, eos_token_id=eos[0], tie_word_embeddings=True,
    )


def build_hf(name, spec, lines, work):
    """Train the tokenizer, make the random model, save both to work/name-hf."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    d = work / f"{name}-hf"
    d.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(spec["family"], lines, CONTEXT)
    n_tok = len(tok)
    vocab = n_tok
    if spec.get("pad_vocab"):
        vocab = -(-(n_tok + 64) // 64) * 64  # 64..127 extra rows, a multiple of 64 (as real padded vocabularies)
    config = hf_config(spec, tok, vocab)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if vocab > n_tok:
        # untrained padding rows: a zero LM-head row gives logit 0, never the max here
        with torch.no_grad():
            model.get_output_embeddings().weight[n_tok:] = 0.0
    model.eval()
    eos = eos_ids(spec["family"], tok)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
        do_sample=False,
    )
    model.generation_config = gen
    model.save_pretrained(str(d), safe_serialization=True)
    save_tokenizer(tok, d)
    return d


def export(hf_dir, out_dir, dtype):
    from optimum.exporters.onnx import main_export

    if out_dir.exists():
        shutil.rmtree(out_dir)
    main_export(
        model_name_or_path=str(hf_dir),
        output=str(out_dir),
        task="text-generation-with-past",
        device="cpu",
        dtype=dtype,
        do_validation=False,
        local_files_only=True,
    )
    return out_dir


def to_fp16_with_ort_tools(src, dst):
    """Fallback: fp32 ONNX -> fp16 (weights, KV and logits) with onnxruntime's float16 converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    m16 = convert_float_to_float16(m, keep_io_types=False)
    onnx.save(m16, str(dst))


# --------------------------------------------------------------------------
# References and checks.


def hf_reference(hf_dir, folder, family, chat, prompt_list):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))  # the committed folder, as a user loads it
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    gen_eos = model.generation_config.eos_token_id
    eos_list = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    tokjson_ok = True
    prompts = []
    for p in prompt_list:
        ids = tok(p)["input_ids"]
        tokjson_ok &= raw.encode(p).ids == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                output_scores=True, return_dict_in_generate=True,
            )
        new = out.sequences[0, len(ids):].tolist()
        gaps = []
        for s in out.scores:
            top = torch.topk(s[0].float(), 2).values
            gaps.append(float(top[0] - top[1]))
        prompts.append(
            dict(
                prompt=p,
                prompt_ids=ids,
                generated_ids=new,
                stopped_on_eos=bool(new) and new[-1] in eos_list,
                generated_ids_within_tokenizer=all(t < len(tok) for t in new),
                generated_text=tok.decode(new),
                min_top2_logit_gap=round(min(gaps), 4),
            )
        )
    info = dict(
        bos_added=bool(tok.bos_token_id is not None and prompts[0]["prompt_ids"][0] == tok.bos_token_id),
        bos_token=tok.bos_token,
        bos_token_id=tok.bos_token_id,
        eos_token=tok.eos_token,
        generation_eos_token_id=eos_list,
        tokenizer_size=len(tok),
        config_vocab_size=model.config.vocab_size,
        max_new_tokens=MAX_NEW_TOKENS,
        prompts=prompts,
    )
    if chat:
        convs = []
        for msgs in CONVERSATIONS:
            rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            tokjson_ok &= raw.encode(rendered, add_special_tokens=False).ids == list(ids)
            assert tok(rendered, add_special_tokens=False)["input_ids"] == list(ids)
            convs.append(dict(messages=msgs, rendered=rendered, ids=list(ids)))
        info["chat"] = convs
        try:
            tok.apply_chat_template(BAD_ORDER, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2 TemplateError from raise_exception
            info["chat_error"] = dict(messages=BAD_ORDER, error=str(e))
        if isinstance(tok.chat_template, dict) and "tool_use" in tok.chat_template:
            msgs = CONVERSATIONS[0]
            rendered = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
            ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
            tokjson_ok &= raw.encode(rendered, add_special_tokens=False).ids == ids
            info["chat_tool_use"] = dict(template="tool_use", messages=msgs, tools=TOOLS, rendered=rendered, ids=ids)
    info["tokenizer_json_matches_autotokenizer"] = bool(tokjson_ok)
    return info


def ort_greedy(folder, prompt_ids, eos_list, max_new):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    ftype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {}
    for n in past_names:
        shp = inputs[n].shape  # [batch, kv_heads, past, head_dim]
        past[n] = np.zeros((1, shp[1], 0, shp[3]), dtype=ftype[inputs[n].type])
    outs = [o.name for o in sess.get_outputs()]
    ids = list(prompt_ids)
    step = list(prompt_ids)
    new = []
    while len(new) < max_new:
        feed = {"input_ids": np.array([step], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(len(ids) - len(step), len(ids), dtype=np.int64)[None]
        feed.update(past)
        res = dict(zip(outs, sess.run(outs, feed)))
        nxt = int(np.argmax(res["logits"][0, -1].astype(np.float32)))
        new.append(nxt)
        ids.append(nxt)
        step = [nxt]
        past = {n: res[n.replace("past_key_values.", "present.")] for n in past_names}
        if nxt in eos_list:
            break
    return new, sorted(inputs)


# --------------------------------------------------------------------------


def copy_user_files(src_hf, export_dir, folder, onnx_files):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in FILES:
        shutil.copy(src_hf / f, folder / f)
    for f in onnx_files:
        shutil.copy(export_dir / f, folder / f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--work", type=pathlib.Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--only", nargs="*", help="build only these models (and their bases)")
    args = ap.parse_args()

    import onnx
    import torch

    torch.set_num_threads(1)
    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="byom-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = corpus()
    table = []
    all_specs = specs()
    names = args.only or list(all_specs)
    hf_dirs, exports = {}, {}
    try:
        for name in names:
            spec = all_specs[name]
            t0 = time.time()
            folder = args.out / name
            status = dict(name=name)
            try:
                base = spec.get("base")
                if base:
                    bspec = all_specs[base]
                    if base not in hf_dirs:
                        hf_dirs[base] = build_hf(base, bspec, lines, work)
                    hf = hf_dirs[base]
                    fam, arch = bspec["family"], bspec["arch"]
                else:
                    hf = hf_dirs[name] = build_hf(name, spec, lines, work)
                    fam, arch = spec["family"], spec["arch"]
                variant = spec.get("variant", "fp32")
                note = ""
                if variant == "fp16":
                    exp = work / f"{name}-onnx"
                    try:
                        export(hf, exp, "fp16")
                        method = "optimum main_export(dtype='fp16', device='cpu')"
                    except Exception as e:  # fall back to converting the fp32 export
                        note = f"optimum fp16 export on CPU failed ({type(e).__name__}: {e}); "
                        fp32 = exports.get(base) or export(hf, work / f"{base}-onnx", "fp32")
                        exp.mkdir(parents=True, exist_ok=True)
                        to_fp16_with_ort_tools(fp32 / "model.onnx", exp / "model.onnx")
                        method = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=False)"
                    note += "fp16 by " + method
                    copy_user_files(hf, exp, folder, ["model.onnx"])
                    cfg = json.loads((folder / "config.json").read_text())
                    for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]:
                        cfg[k] = "float16"
                    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
                elif variant == "external":
                    exp = exports.get(base) or export(hf, work / f"{base}-onnx", "fp32")
                    copy_user_files(hf, exp, folder, [])
                    m = onnx.load(str(exp / "model.onnx"))
                    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True,
                                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
                    (folder / "model.onnx_data").chmod(0o644)  # onnx writes it 0600
                    note = "fp32 export re-saved with onnx.save_model(save_as_external_data=True)"
                else:
                    exp = exports[name] = export(hf, work / f"{name}-onnx", "fp32")
                    copy_user_files(hf, exp, folder, ["model.onnx"])
                chat = fam != "gpt2"
                src = all_specs[base] if base else spec
                ref = hf_reference(hf, folder, fam, chat, PROMPTS + src.get("extra_prompts", []))
                ref = dict(model=name, family=fam,
                           architecture=json.loads((folder / "config.json").read_text())["architectures"][0],
                           onnx_dtype="float16" if variant == "fp16" else "float32",
                           reference="transformers PyTorch fp32 generate(do_sample=False)", **ref)
                if note:
                    ref["note"] = note
                eos = ref["generation_eos_token_id"]
                mism = []
                for p in ref["prompts"]:
                    got, in_names = ort_greedy(folder, p["prompt_ids"], eos, MAX_NEW_TOKENS)
                    if got != p["generated_ids"]:
                        mism.append(dict(prompt=p["prompt"], ort=got, transformers=p["generated_ids"]))
                ref["onnx_inputs"] = in_names
                ref["ort_greedy_matches_transformers"] = not mism
                if mism:
                    ref["ort_mismatches"] = mism
                (folder / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
                status.update(arch=ref["architecture"], dtype=ref["onnx_dtype"], match=not mism,
                              tokjson=ref["tokenizer_json_matches_autotokenizer"], bos=ref["bos_added"],
                              eos=eos, pos_ids="position_ids" in in_names, secs=time.time() - t0, err="")
            except Exception as e:
                traceback.print_exc()
                status.update(arch=spec.get("arch", spec.get("base")), match=False, err=f"{type(e).__name__}: {e}"[:200])
            table.append(status)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'model':<20} {'architecture':<18} {'dtype':<8} {'ORT==HF':<8} {'tok.json':<8} "
          f"{'BOS':<5} {'pos_ids':<7} {'eos':<12} {'s':>5}  error")
    for s in table:
        print(f"{s['name']:<20} {str(s.get('arch')):<18} {s.get('dtype', '-'):<8} {str(s['match']):<8} "
              f"{str(s.get('tokjson', '-')):<8} {str(s.get('bos', '-')):<5} {str(s.get('pos_ids', '-')):<7} "
              f"{str(s.get('eos', '-')):<12} {s.get('secs', 0):5.1f}  {s.get('err', '')}")
    total = 0
    print()
    for d in sorted(p for p in args.out.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        total += size
        print(f"{d.name:<20} {size / 1024:8.1f} KiB  {' '.join(sorted(f.name for f in d.iterdir()))}")
    print(f"total {total / 2**20:.2f} MiB in {args.out}")
    return 0 if all(s["match"] for s in table) else 1


if __name__ == "__main__":
    sys.exit(main())
