"""Drives the orchestrator's OpenAI-compatible API with the official `openai`
package. Called by tests/openai.rs with the base URL and the greedy text the
gRPC API produced for the same prompt; exits non-zero on any mismatch."""

import json
import sys

import openai

base_url, prompt, expected = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused")

models = client.models.list()
assert [m.id for m in models.data] == ["duo"], models

# A completion, greedy: identical to the gRPC result.
c = client.completions.create(model="duo", prompt=prompt, max_tokens=48, temperature=0)
assert c.choices[0].text == expected, (c.choices[0].text, expected)
assert c.usage.completion_tokens == 48 or c.choices[0].finish_reason == "stop", c.usage
assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

# The same, streamed (server-sent events ending with [DONE]).
parts, finish = [], None
for chunk in client.completions.create(model="duo", prompt=prompt, max_tokens=48, temperature=0, stream=True):
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
assert "".join(parts) == expected, ("".join(parts), expected)
assert finish in ("length", "stop"), finish

# Extension fields: mode and gamma; stats come back under "duo".
for mode in ("autoregressive", "speculative", "duodecoding"):
    c = client.completions.create(model="duo", prompt=prompt, max_tokens=48, temperature=0,
                                  extra_body={"mode": mode, "gamma": 3})
    assert c.choices[0].text == expected, (mode, c.choices[0].text)
    duo = c.model_extra["duo"]
    assert duo["accepted"] <= duo["drafted"], duo

# Sampling with a seed is reproducible.
a = client.completions.create(model="duo", prompt=prompt, max_tokens=24, temperature=0.8, seed=7)
b = client.completions.create(model="duo", prompt=prompt, max_tokens=24, temperature=0.8, seed=7)
assert a.choices[0].text == b.choices[0].text

# Logprobs.
c = client.completions.create(model="duo", prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
lp = c.choices[0].logprobs
assert len(lp.token_logprobs) == len(lp.tokens) == c.usage.completion_tokens, lp

# Chat completion (play-script template) and its stream.
chat = client.chat.completions.create(model="duo", max_tokens=32, temperature=0,
                                      messages=[{"role": "user", "content": "What news from Rome?"}])
assert chat.choices[0].message.role == "assistant"
streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model="duo", max_tokens=32, temperature=0, stream=True,
    messages=[{"role": "user", "content": "What news from Rome?"}]))
assert streamed == chat.choices[0].message.content, (streamed, chat.choices[0].message.content)

# Bad requests: OpenAI's error shape and status.
for kwargs, needle in [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    # The API's own field name, not the gRPC one.
    (dict(max_tokens=0), "max_tokens must be"),
    (dict(max_tokens=100000), "context"),
    (dict(extra_body={"mode": "warp"}), "unknown mode"),
]:
    try:
        client.completions.create(model="duo", prompt=prompt, **kwargs)
        raise AssertionError(f"{kwargs} was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert needle in e.body["message"], (needle, e.body)
        assert "max_new_tokens" not in e.body["message"], e.body
try:
    client.completions.create(model="other-model", prompt=prompt, max_tokens=4)
    raise AssertionError("unknown model accepted")
except openai.BadRequestError as e:
    assert "unknown model" in e.body["message"]

print(json.dumps({"ok": True}))
