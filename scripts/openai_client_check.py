"""Drives `detoxfuse serve` with the official OpenAI Python client (the server's integration
test runs this with .venv-openai; see scripts/setup_openai_env.sh).

usage: openai_client_check.py BASE_URL MODEL API_KEY
Prints one JSON object with what each call returned; the Rust test asserts on it.
"""
import json
import sys

import openai

base_url, model, key = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]

PROMPT = "The best thing about rainy days is"
common = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.95, seed=7)


def completion_texts(stream, alpha, n=1):
    extra = {} if alpha is None else {"alpha": alpha}
    if not stream:
        r = client.completions.create(n=n, extra_body=extra, **common)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)], r.usage.completion_tokens
    texts = [""] * n
    usage = None
    for chunk in client.completions.create(n=n, stream=True, extra_body=extra, **common):
        for c in chunk.choices:
            texts[c.index] += c.text
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    return texts, usage


for alpha in (0.0, 0.3, None):
    name = "default" if alpha is None else str(alpha)
    plain, used = completion_texts(False, alpha, n=2)
    streamed, used_s = completion_texts(True, alpha, n=2)
    out[f"completions_{name}"] = {"texts": plain, "streamed": streamed, "usage": used, "usage_streamed": used_s}

chat_common = dict(
    model=model,
    messages=[{"role": "user", "content": "Describe a rainy day in one sentence."}],
    max_tokens=16,
    temperature=0.8,
    top_p=0.95,
    seed=3,
)
for alpha in (0.0, 0.3):
    r = client.chat.completions.create(extra_body={"alpha": alpha}, **chat_common)
    streamed = ""
    roles = []
    for chunk in client.chat.completions.create(stream=True, extra_body={"alpha": alpha}, **chat_common):
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            streamed += c.delta.content or ""
    out[f"chat_{alpha}"] = {
        "text": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "streamed": streamed,
        "stream_roles": roles,
    }

try:
    client.completions.create(extra_body={"alpha": 1.5}, **common)
    out["bad_alpha"] = "accepted"
except openai.BadRequestError as e:
    out["bad_alpha"] = {"status": e.status_code, "message": str(e)}

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = {"status": e.status_code}

print(json.dumps(out))
