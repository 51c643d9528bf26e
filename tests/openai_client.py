#!/usr/bin/env python3
"""Talks to a running `nibble serve` with the official `openai` Python client
and checks the shapes it gets back.

    nibble serve -m target/models/smollm2-q4.nbl --port 8080 &
    python tests/openai_client.py http://127.0.0.1:8080/v1

Needs `pip install openai`. Exits non-zero on the first failed check.
"""

import sys

import openai
from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=120)
print(f"openai {openai.__version__} -> {base_url}")

models = client.models.list()
ids = [m.id for m in models.data]
print("models:", ids)
assert len(ids) == 1, ids
model = ids[0]

messages = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]

# Non-streaming.
r = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=48, seed=1
)
print("non-streaming:", r.model_dump_json())
assert r.object == "chat.completion", r.object
assert r.id.startswith("chatcmpl-"), r.id
assert len(r.choices) == 1
choice = r.choices[0]
assert choice.index == 0
assert choice.message.role == "assistant"
assert isinstance(choice.message.content, str) and choice.message.content
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
u = r.usage
assert u.prompt_tokens > 0 and u.completion_tokens > 0
assert u.total_tokens == u.prompt_tokens + u.completion_tokens
text = choice.message.content
print("reply:", repr(text))

# Streaming, with a usage chunk at the end.
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    temperature=0,
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage, n_chunks = [], None, None, 0
for chunk in stream:
    n_chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk.object
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason is not None:
            finish = c.finish_reason
streamed = "".join(pieces)
print(f"streaming: {n_chunks} chunks, finish_reason={finish}, usage={usage.model_dump_json()}")
print("streamed reply:", repr(streamed))
assert streamed == text, (streamed, text)
assert finish == choice.finish_reason
assert usage.completion_tokens == u.completion_tokens

# Legacy completions.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print("completion:", c.model_dump_json())
assert c.object == "text_completion" and c.choices[0].text

# A bad request surfaces as the client's typed error.
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature=5 was accepted")
except openai.BadRequestError as e:
    print("bad request:", e.status_code, e.body)
    assert e.status_code == 400 and e.body["param"] == "temperature"

print("OK")
