"""Bad input gets a 4xx with an OpenAI-style error body naming the problem, and the server keeps
answering correctly afterwards; the API key is enforced."""

from __future__ import annotations

import httpx
import openai
import pytest

GOOD = {"model": "xlstm-tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
CHAT = {"model": "xlstm-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}

# (path, body, status, param, words the message must contain)
CASES = [
    ("completions", {**GOOD, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ("completions", {**GOOD, "max_tokens": 5000}, 400, "max_tokens", "maximum model length"),
    ("completions", {**GOOD, "prompt": list(range(1, 1000)) * 5}, 400, "prompt", "maximum model length"),
    ("completions", {**GOOD, "prompt": [0, 5, 5000]}, 400, "prompt", "token ids"),
    ("completions", {**GOOD, "prompt": ""}, 400, "prompt", "empty"),
    ("completions", {**GOOD, "prompt": []}, 400, "prompt", "empty"),
    ("completions", {**GOOD, "temperature": -0.5}, 400, "temperature", "temperature"),
    ("completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ("completions", {**GOOD, "frequency_penalty": -2.5}, 400, "frequency_penalty", "[-2, 2]"),
    ("completions", {**GOOD, "top_k": -2}, 400, "top_k", "top_k"),
    ("completions", {**GOOD, "min_p": 2}, 400, "min_p", "min_p"),
    ("completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty"),
    ("completions", {**GOOD, "stop": ["ok", ""]}, 400, "stop", "stop"),
    ("completions", {**GOOD, "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ("completions", {**GOOD, "n": 0}, 400, "n", "n must be"),
    ("completions", {**GOOD, "echo": True}, 400, "echo", "not supported"),
    ("completions", {**GOOD, "logit_bias": {"5": 1.0}}, 400, "logit_bias", "not supported"),
    ("completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    # wrong types
    ("completions", {**GOOD, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "number"),
    ("completions", {**GOOD, "stream": "yes"}, 400, "stream", "boolean"),
    ("completions", {**GOOD, "prompt": 5}, 400, "prompt", "prompt"),
    ("completions", {**GOOD, "seed": 1.5}, 400, "seed", "integer"),
    ("completions", {"prompt": "a"}, 400, "model", "required"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "list"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "user"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens", ">= 1"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "[0, 20]"),
    ("chat/completions", {**CHAT, "temperature": float("inf")}, 400, "temperature", "finite"),  # `Infinity`
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("chat/completions", {**CHAT, "model": "nope"}, 404, "model", "nope"),
]


def _post(server, path: str, content: bytes | None = None, json_body=None, headers: dict | None = None,
          key: str | None = "default") -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {server.api_key if key == 'default' else key}"
    if json_body is not None:
        import json

        content = json.dumps(json_body).encode()  # allow_nan: inf goes out as the non-JSON `Infinity`
    return httpx.post(f"{server.url}/v1/{path}", content=content, headers=h, timeout=30)


def _check_error(r: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    assert words.lower() in body["error"]["message"].lower(), body
    assert body["error"]["type"] == "invalid_request_error"


def _still_serving(server, ref_text: str) -> None:
    r = _post(server, "completions", json_body=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref_text


@pytest.fixture(scope="module")
def good_text(ref) -> str:
    return ref([GOOD["prompt"]], temperature=0, max_tokens=5)[0].text


@pytest.mark.parametrize("path,body,status,param,words", CASES)
def test_bad_input_gets_a_4xx_naming_the_problem(server, good_text, path, body, status, param, words):
    for stream in (False, True):
        if "stream" in body or "stream_options" in body:
            if stream:
                continue
            b = body
        else:
            b = {**body, "stream": stream}
        _check_error(_post(server, path, json_body=b), status, param, words)
    _still_serving(server, good_text)


def test_malformed_json_and_non_object_bodies(server, good_text):
    _check_error(_post(server, "completions", content=b'{"model": "xlstm-tiny", "prompt": '), 400, None, "JSON")
    _check_error(_post(server, "completions", content=b"[1, 2]"), 400, None, "request body")
    _check_error(_post(server, "completions", content=b""), 400, None, "request body")
    _still_serving(server, good_text)


def test_oversized_body_gets_413(server, good_text):
    big = {**GOOD, "prompt": "a" * (65 * 1024)}
    _check_error(_post(server, "completions", json_body=big), 413, None, "too large")

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "xlstm-tiny", "prompt": "'
        for _ in range(70):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json", "Authorization": f"Bearer {server.api_key}"})
    _check_error(r, 413, None, "too large")
    _still_serving(server, good_text)


def test_unknown_route_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing-here", headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 405 and "error" in r.json()


def test_api_key(server, good_text):
    for key in (None, "wrong-key"):
        r = _post(server, "completions", json_body=GOOD, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = httpx.get(f"{server.url}/v1/models", headers={} if key is None else {"Authorization": f"Bearer {key}"})
        assert r.status_code == 401
    # Probes and scrapers need no key.
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    _still_serving(server, good_text)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="xlstm-tiny", messages=[{"role": "user", "content": "x"}], top_p=0,
                                       stream=True)
    assert e.value.body["param"] == "top_p"
