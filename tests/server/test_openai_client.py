"""The official `openai` client against a real server on loopback: chat and completions, whole and
streamed, usage, stop strings, n, seeds and max_tokens."""

import openai
import pytest

from adaptserve import LLM, SamplingParams

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(smollm2):
    return LLM.from_checkpoint(smollm2, kv_cache_memory_gib=0.1, max_model_len=2048)


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == MODEL


def test_chat_greedy_matches_the_offline_engine(client, offline):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    (expected,) = offline.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert "Paris" in choice.message.content
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-") and response.created > 0


def test_completion_usage_counts_the_tokens_produced(client, smollm2):
    response = client.completions.create(
        model=MODEL, prompt="The three primary colors are", max_tokens=12, temperature=0, logprobs=1
    )
    choice = response.choices[0]
    assert response.usage.prompt_tokens == len(smollm2.tokenizer.encode("The three primary colors are"))
    assert response.usage.completion_tokens == len(choice.logprobs.tokens) <= 12
    assert "".join(choice.logprobs.tokens) == choice.text


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_streaming_equals_the_whole_response(client, api):
    kwargs = {"model": MODEL, "max_tokens": 20, "temperature": 0}
    if api == "chat":
        create, kwargs["messages"] = client.chat.completions.create, QUESTION
    else:
        create, kwargs["prompt"] = client.completions.create, "Once upon a time, in a small village,"
    whole = create(**kwargs)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    if api == "chat":
        streamed = "".join(c.choices[0].delta.content or "" for c in text_chunks)
        expected = whole.choices[0].message.content
    else:
        streamed = "".join(c.choices[0].text for c in text_chunks)
        expected = whole.choices[0].text
    assert streamed == expected
    assert len(text_chunks) > 2  # really streamed, not one blob
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_ends_with_done(server):
    import httpx

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_stop_string_ends_the_text_before_it(client):
    kwargs = {"model": MODEL, "prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 30, "temperature": 0}
    free = client.completions.create(**kwargs).choices[0].text
    assert " 8" in free, free  # the stop below must really occur
    stopped = client.completions.create(stop=[" 8"], **kwargs).choices[0]
    assert stopped.text == free[: free.index(" 8")]
    assert stopped.finish_reason == "stop"
    streamed = client.completions.create(stop=[" 8"], stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == stopped.text


def test_n_gives_n_choices(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, n=2, seed=7
    )
    assert [c.index for c in response.choices] == [0, 1]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, n=2, seed=7, stream=True
        )
    )
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == {c.index: c.message.content for c in response.choices}


def test_same_seed_same_text(client):
    kwargs = {"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 16, "temperature": 1.0}
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    again = client.completions.create(seed=1234, **kwargs).choices[0].text
    other = [client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)]
    assert first == again
    assert any(text != first for text in other)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_respected(client, field):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, extra_body={"ignore_eos": True}, **{field: 5}
    )
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"
    completion = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 7


def test_several_prompts_in_one_completion_request(client):
    prompts = ["The sky is", "Water boils at"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    assert response.choices[0].text == singles[0].choices[0].text
    assert response.choices[2].text == singles[1].choices[0].text


def test_system_prompt_goes_through_the_chat_template(client, smollm2):
    messages = [{"role": "system", "content": "You are a pirate. Always answer like a pirate."}, *QUESTION]
    pirate = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "You are a pirate" in prompt
    assert pirate.usage.prompt_tokens == len(smollm2.tokenizer.encode(prompt, add_special_tokens=False))
    assert pirate.choices[0].message.content


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_priority_field_and_header_are_accepted(client, server):
    import httpx

    response = client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=2,
        extra_body={"priority": "high"},
        extra_headers={"x-priority": "low"},
    )
    assert response.usage.completion_tokens <= 2
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{server.v1}/completions", json=body, headers={"x-priority": "-3"}).status_code == 200
