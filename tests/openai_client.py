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

# The same, streamed (server-sent events ending with [DONE]): no usage
# unless asked for, no empty chunk but the last.
parts, finish = [], None
chunks = list(client.completions.create(model="duo", prompt=prompt, max_tokens=48, temperature=0, stream=True))
for chunk in chunks:
    assert chunk.usage is None, chunk
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
assert all(p for p in parts[:-1]), parts
assert "".join(parts) == expected, ("".join(parts), expected)
assert finish in ("length", "stop"), finish
assert chunks[-1].model_extra["duo"]["mode"] == "duodecoding", chunks[-1]

# Extension fields: mode and gamma; stats come back under "duo".
for mode in ("autoregressive", "speculative", "duodecoding"):
    c = client.completions.create(model="duo", prompt=prompt, max_tokens=48, temperature=0,
                                  extra_body={"mode": mode, "gamma": 3})
    assert c.choices[0].text == expected, (mode, c.choices[0].text)
    duo = c.model_extra["duo"]
    assert duo["accepted"] <= duo["drafted"], duo

# Logprobs.
c = client.completions.create(model="duo", prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
lp = c.choices[0].logprobs
assert len(lp.token_logprobs) == len(lp.tokens) == c.usage.completion_tokens, lp

# Chat completion (play-script template) and its stream.
chat = client.chat.completions.create(model="duo", max_tokens=32, temperature=0,
                                      messages=[{"role": "user", "content": "What news from Rome?"}])
assert chat.choices[0].message.role == "assistant"
chunks = list(client.chat.completions.create(
    model="duo", max_tokens=32, temperature=0, stream=True,
    messages=[{"role": "user", "content": "What news from Rome?"}]))
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
assert streamed == chat.choices[0].message.content, (streamed, chat.choices[0].message.content)
# The role in the first delta only, as OpenAI sends it; content in every
# delta but the last (which carries the finish reason).
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
assert all(ch.choices[0].delta.role is None for ch in chunks[1:]), chunks
assert all(ch.choices[0].delta.content for ch in chunks[1:-1]), chunks
# include_usage: a last chunk with the usage and no choices; null before.
chunks = list(client.chat.completions.create(
    model="duo", max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "What news from Rome?"}]))
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1, chunks[-1]
assert all(ch.usage is None and len(ch.choices) == 1 for ch in chunks[:-1]), chunks

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
# An unknown model is 404 model_not_found, in a body as in GET /v1/models/x.
try:
    client.completions.create(model="other-model", prompt=prompt, max_tokens=4)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
    assert "unknown model" in e.body["message"] and e.body["code"] == "model_not_found", e.body
try:
    client.models.retrieve("other-model")
    raise AssertionError("unknown model found")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body


# Every option is honoured or refused by name (docs/reliability.md).
def refused(call, param, **kwargs):
    """`call(**kwargs)` is a 400 whose error object names `param`."""
    try:
        call(**kwargs)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.body["type"] == "invalid_request_error", e.body
        assert e.body["param"] == param, (param, e.body)
        assert param in e.body["message"], (param, e.body)
        return
    raise AssertionError(f"{kwargs} was accepted")

def complete(**kwargs):
    return client.completions.create(model="duo", prompt=prompt, **{"max_tokens": 4, **kwargs})

def chat(messages=None, **kwargs):
    return client.chat.completions.create(
        model="duo", messages=messages or [{"role": "user", "content": "What news?"}], **{"max_tokens": 4, **kwargs})

for param, kwargs in [
    ("best_of", dict(best_of=2)),
    ("suffix", dict(suffix=" and so farewell.")),
    ("logit_bias", dict(logit_bias={"50": -100})),
    ("presence_penalty", dict(presence_penalty=0.5)),
    ("frequency_penalty", dict(frequency_penalty=-1)),
    ("logprobs", dict(logprobs=2)),
    ("n", dict(n=2)),
    ("echo", dict(echo=True, logprobs=1)),
    ("stream_options", dict(stream_options={"include_usage": True})),
    ("seed", dict(seed="x")),
    ("temperature", dict(temperature=-1)),
    ("top_k", dict(extra_body={"top_k": -1})),
    ("mode", dict(extra_body={"mode": "warp"})),
    ("bogus", dict(extra_body={"bogus": 1})),
]:
    refused(complete, param, **kwargs)
tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
for param, kwargs in [
    ("tools", dict(tools=[tool])),
    ("tool_choice", dict(tool_choice="auto")),
    ("functions", dict(functions=[tool["function"]])),
    ("function_call", dict(function_call="auto")),
    ("response_format", dict(response_format={"type": "json_object"})),
    ("top_logprobs", dict(logprobs=True, top_logprobs=2)),
    ("store", dict(store=True)),
    ("service_tier", dict(service_tier="flex")),
    ("modalities", dict(modalities=["text", "audio"])),
    ("reasoning_effort", dict(reasoning_effort="low")),
    ("logit_bias", dict(logit_bias={"50": 5})),
    ("n", dict(n=3)),
    ("bogus", dict(extra_body={"bogus": True})),
    ("messages.[0].content.[1].type", dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])),
    ("messages.[1].role", dict(messages=[{"role": "user", "content": "Call it."},
                                         {"role": "tool", "content": "42", "tool_call_id": "c1"}])),
    ("messages.[0].role", dict(messages=[{"role": "narrator", "content": "Enter Brutus."}])),
    ("stop", dict(stop=[f"<{i}>" for i in range(17)])),
]:
    refused(chat, param, **kwargs)

# Options with their default (or a harmless) value are accepted.
c = complete(temperature=0, n=1, best_of=1, suffix="", logit_bias={}, presence_penalty=0,
             frequency_penalty=0, user="u-1", seed=-5)
assert c.choices[0].text, c
c = chat(temperature=0, n=1, logit_bias={}, presence_penalty=0, frequency_penalty=0, user="u-1",
         store=False, metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=True,
         response_format={"type": "text"}, tool_choice="none", top_logprobs=0, modalities=["text"])
assert c.choices[0].message.role == "assistant", c
streamed = [ch for ch in complete(temperature=0, stream=True, stream_options={"include_usage": True})]
assert streamed[-1].usage.completion_tokens >= 1 and streamed[-1].choices == [], streamed[-1]

# echo: the prompt leads the text, unary and streamed.
c = client.completions.create(model="duo", prompt=prompt, max_tokens=8, temperature=0, echo=True)
text = c.choices[0].text
assert text.startswith(prompt) and expected.startswith(text[len(prompt):]), (text, expected)
parts = "".join(ch.choices[0].text for ch in client.completions.create(
    model="duo", prompt=prompt, max_tokens=8, temperature=0, echo=True, stream=True))
assert parts == text, (parts, text)

# logprobs 0 and 1: each generated token's log-probability (no alternatives).
for n in (0, 1):
    c = client.completions.create(model="duo", prompt=prompt, max_tokens=6, temperature=0, logprobs=n)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == c.usage.completion_tokens, lp
    assert all(x <= 0 for x in lp.token_logprobs), lp
    assert "".join(lp.tokens).startswith(c.choices[0].text), (lp.tokens, c.choices[0].text)

# Chat logprobs: the same numbers in the chat shape, unary and streamed.
msgs = [{"role": "user", "content": "What news from Rome?"}]
c = client.chat.completions.create(model="duo", max_tokens=12, temperature=0, messages=msgs, logprobs=True)
content = c.choices[0].logprobs.content
assert len(content) == c.usage.completion_tokens, (content, c.usage)
assert all(t.logprob <= 0 and t.top_logprobs == [] and bytes(t.bytes).decode() == t.token for t in content), content
streamed = []
for ch in client.chat.completions.create(model="duo", max_tokens=12, temperature=0, messages=msgs,
                                         logprobs=True, stream=True):
    if ch.choices and ch.choices[0].logprobs:
        streamed += ch.choices[0].logprobs.content
# (Equal up to float rounding: verification forwards of other widths.)
assert [t.token for t in streamed] == [t.token for t in content], (streamed, content)
assert all(abs(s.logprob - t.logprob) < 1e-3 for s, t in zip(streamed, content)), (streamed, content)

# Text parts are joined; developer speaks as system; a name is the speaker.
whole = chat(temperature=0, messages=[{"role": "user", "content": "What news from Rome?"}])
joined = chat(temperature=0, messages=[{"role": "user", "content": [
    {"type": "text", "text": "What news "}, {"type": "text", "text": "from Rome?"}]}])
assert joined.choices[0].message.content == whole.choices[0].message.content, (joined, whole)
system = chat(temperature=0, messages=[{"role": "system", "content": "Be brief."}, *msgs])
developer = chat(temperature=0, messages=[{"role": "developer", "content": "Be brief."}, *msgs])
assert system.choices[0].message.content == developer.choices[0].message.content
chat(messages=[{"role": "user", "name": "Brutus", "content": "Speak."}])
refused(chat, "messages.[0].name", messages=[{"role": "user", "name": "a\nb", "content": "Speak."}])

# Stop sequences in chat: the template's own end of turn does not take a
# user's place when one of theirs makes it redundant ("\n" ends the turn
# no later); 15 others fit beside it.
stops = [f"<{i}>" for i in range(15)]
chat(stop=stops)
c = chat(stop=stops + ["\n"], max_tokens=48, temperature=0)
assert "\n" not in c.choices[0].message.content, c

# Sampling with a seed is reproducible when the draft schedule is fixed
# (autoregressive, speculative with a gamma, one branch with a gamma) or the
# drafts are greedy. With sampled drafts under the adaptive budget
# controller a seed reproduces the distribution, not the tokens: which
# positions are drafted, and so which random draws verification makes,
# depends on timing (documented with `seed` in duo.proto).
for extra in ({"mode": "autoregressive"}, {"mode": "speculative", "gamma": 3},
              {"gamma": 3, "max_branches": 1}, {"greedy_drafts": True}):
    a = client.completions.create(model="duo", prompt=prompt, max_tokens=24, temperature=0.8, seed=7,
                                  extra_body=extra)
    b = client.completions.create(model="duo", prompt=prompt, max_tokens=24, temperature=0.8, seed=7,
                                  extra_body=extra)
    assert a.choices[0].text == b.choices[0].text, ("same seed, different text", extra, a.choices[0].text,
                                                    b.choices[0].text)

print(json.dumps({"ok": True}))
