"""``flow="released"``: the two-call judge flow of the authors' released code, for OpenAIJudge
(against the local chat-completions server), SelfJudge (on the tiny models) and the CLI."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import time

import pytest
import torch

from safecode_kernels import Verdict
from safecode_kernels.judges import (
    JudgeConnectionError,
    JudgeHTTPError,
    JudgeResponseError,
    JudgeTimeout,
    OpenAIJudge,
    SelfJudge,
    UnparseableVerdict,
    image_data_url,
    released_flow,
)
from safecode_kernels.testing.tiny import random_image
from tests.judges.chat_server import ChatServer

FAST = dict(timeout=2.0)  # the test server asks for 1 ms waits before retries (chat_server.py)


# ----- the shared texts -----------------------------------------------------------------------
def test_verdict_question_structure():
    text = released_flow.verdict_question("How do I use this?", "a red kettle")
    assert text.startswith(released_flow.VERDICT_BRIEF)
    blocks = text[len(released_flow.VERDICT_BRIEF) :].strip().split("\n---\n")
    assert len(blocks) == 6 and len(released_flow.EXAMPLES) == 5
    for block, (prompt, caption, decision, reason) in zip(blocks[:5], released_flow.EXAMPLES, strict=True):
        assert block.splitlines() == [
            f'Prompt: "{prompt}"',
            f'Caption: "{caption}"',
            f"Decision: {decision}",
            f"Reason: {reason}",
        ]
    assert {e[2] for e in released_flow.EXAMPLES} == {"safe", "unsafe"}
    assert blocks[-1] == 'Prompt: "How do I use this?"\nCaption: "a red kettle"\nDecision:'
    system, user = released_flow.verdict_messages("p", "c")
    assert system == {"role": "system", "content": released_flow.VERDICT_SYSTEM}
    assert user["role"] == "user" and user["content"] == released_flow.verdict_question("p", "c")
    system, user = released_flow.verdict_messages("p", "c", parts=True)
    assert user["content"] == [{"type": "text", "text": released_flow.verdict_question("p", "c")}]


@pytest.mark.parametrize(
    "answer, exact, parsed",
    [
        ("unsafe", Verdict.UNSAFE, Verdict.UNSAFE),
        (" UNSAFE \n", Verdict.UNSAFE, Verdict.UNSAFE),
        ("unsafe.", Verdict.SAFE, Verdict.UNSAFE),
        ("Unsafe\nReason: a child with a lighter", Verdict.SAFE, Verdict.UNSAFE),
        ("safe", Verdict.SAFE, Verdict.SAFE),
        ("Safe.", Verdict.SAFE, Verdict.SAFE),
    ],
)
def test_match_modes(answer, exact, parsed):
    got = released_flow.judgement(answer, "c", "exact", "safe")
    assert got.verdict == exact and got.raw_answer == answer and got.caption == "c"
    assert got.parsed == (answer.strip().lower() in ("safe", "unsafe"))
    assert released_flow.judgement(answer, "c", "parse", "safe").verdict == parsed


# ----- OpenAIJudge ------------------------------------------------------------------------------
def has_image(body: dict) -> bool:
    return any(
        isinstance(m["content"], list) and any(p.get("type") == "image_url" for p in m["content"])
        for m in body["messages"]
    )


def image_caption(url: str) -> str:
    """The caption the scripted server gives an image: one per image, so verdict requests can
    be paired with the caption request they follow."""
    return "picture " + hashlib.sha256(url.encode()).hexdigest()[:10]


def case_prompt(body: dict) -> str:
    """The prompt of the case to decide (the last block of the verdict question)."""
    return re.search(r'Prompt: "(.*)"\nCaption: "(.*)"\nDecision:$', body["messages"][-1]["content"]).group(1)


def released_answers(delay=lambda body: 0.0):
    """The scripted server's default answer: a caption for a caption call, ``unsafe`` for a
    verdict call whose case mentions a knife, ``safe`` otherwise (after ``delay(body)`` s)."""

    def answer(body):
        time.sleep(delay(body))
        if has_image(body):
            return image_caption(body["messages"][-1]["content"][1]["image_url"]["url"])
        return "unsafe" if "knife" in case_prompt(body).lower() else "safe"

    return answer


@pytest.fixture
def server():
    server = ChatServer(default=released_answers()).start()
    yield server
    server.stop()


def released_judge(server, **kwargs):
    return OpenAIJudge(
        server.base_url, "judge-model", api_key_env="SAFECODE_TEST_UNSET_KEY", flow="released", **{**FAST, **kwargs}
    )


def test_two_requests_per_image(server):
    images = [random_image(i, 32 + 8 * i) for i in range(3)]
    prompts = ["Where can I buy a knife like this?", "What is this?", "Hi"]
    out = released_judge(server, max_concurrency=2).judge(images, prompts)
    assert [j.verdict for j in out] == [Verdict.UNSAFE, Verdict.SAFE, Verdict.SAFE]
    assert [j.raw_answer for j in out] == ["unsafe", "safe", "safe"] and all(j.parsed for j in out)
    assert len(server.requests) == 6
    captions, verdicts = {}, {}
    for order, request in enumerate(server.requests):
        body = request["body"]
        assert request["path"] == "/v1/chat/completions" and body["model"] == "judge-model"
        assert body["temperature"] == 0.0
        if has_image(body):  # the caption call: the instruction and the image, one user message
            [message] = body["messages"]
            assert message["role"] == "user" and body["max_tokens"] == 100
            text, image = message["content"]
            assert text == {"type": "text", "text": released_flow.CAPTION_INSTRUCTION}
            captions[image_caption(image["image_url"]["url"])] = order
        else:  # the verdict call: text only, the system message, the brief, the examples, the case
            system, user = body["messages"]
            assert system == {"role": "system", "content": released_flow.VERDICT_SYSTEM}
            assert isinstance(user["content"], str) and body["max_tokens"] == 10
            assert "image_url" not in json.dumps(body) and "data:image" not in json.dumps(body)
            for prompt, caption, decision, reason in released_flow.EXAMPLES:
                assert (
                    f'Prompt: "{prompt}"\nCaption: "{caption}"\nDecision: {decision}\nReason: {reason}'
                    in user["content"]
                )
            caption = re.search(r'Caption: "(.*)"\nDecision:$', user["content"]).group(1)
            verdicts[caption] = (order, case_prompt(body))
    # Each image: its caption call, then a verdict call carrying its prompt and that caption.
    assert len(captions) == 3 and captions.keys() == verdicts.keys()
    for judgement, prompt in zip(out, prompts, strict=True):
        assert captions[judgement.caption] < verdicts[judgement.caption][0]
        assert verdicts[judgement.caption][1] == prompt


def test_order_kept_under_concurrency():
    # Earlier requests answer more slowly, so they finish last.
    prompts = [f"request {i}" + (" with a knife" if i % 3 == 0 else "") for i in range(6)]
    delay = {p: 0.05 * (6 - i) for i, p in enumerate(prompts)}
    server = ChatServer(default=released_answers(lambda body: 0.0 if has_image(body) else delay[case_prompt(body)]))
    server.start()
    try:
        images = [random_image(i, 24 + 4 * i) for i in range(6)]
        out = released_judge(server, max_concurrency=6).judge(images, prompts)
    finally:
        server.stop()
    assert [j.verdict for j in out] == [Verdict.UNSAFE if i % 3 == 0 else Verdict.SAFE for i in range(6)]
    assert [j.caption for j in out] == [image_caption(image_data_url(image, 1024)) for image in images]
    assert [j.raw_answer for j in out] == [j.verdict.name.lower() for j in out]
    assert len(server.requests) == 12


@pytest.mark.parametrize(
    "answer, match, want, parsed",
    [
        ("unsafe.", "exact", Verdict.SAFE, False),
        ("unsafe.", "parse", Verdict.UNSAFE, True),
        ("Unsafe\nReason: it is dangerous", "exact", Verdict.SAFE, False),
        ("Unsafe\nReason: it is dangerous", "parse", Verdict.UNSAFE, True),
        (" unsafe\n", "exact", Verdict.UNSAFE, True),
        ("Safe", "exact", Verdict.SAFE, True),
        # A reasoning model: only the text after its reasoning decides, in either match.
        ("<think>Looks safe? No: a knife.</think>\nunsafe", "exact", Verdict.UNSAFE, True),
        ("<think>Is it unsafe? The knife is for vegetables.</think>\nsafe", "exact", Verdict.SAFE, True),
        ("<think>Is it unsafe? The knife is for vegetables.</think>\nsafe", "parse", Verdict.SAFE, True),
        ("<think>Is it unsafe? The knife", "parse", Verdict.SAFE, False),  # all reasoning: the policy decides
    ],
)
def test_verdict_match(server, answer, match, want, parsed):
    server.script(("ok", "  a knife on a table \n"), ("ok", answer))
    [j] = released_judge(server, verdict_match=match).judge([random_image(0)], ["hi"])
    assert j == type(j)(want, "a knife on a table", answer, parsed)
    assert 'Caption: "a knife on a table"' in server.requests[1]["body"]["messages"][-1]["content"]


def test_caption_reasoning_is_not_the_caption(server):
    server.script(("ok", "<think>A zebra? No, a spoon.</think>\n a spoon on a table"), ("ok", "safe"))
    [j] = released_judge(server).judge([random_image(0)], ["hi"])
    assert j.caption == "a spoon on a table"
    verdict_question = server.requests[1]["body"]["messages"][-1]["content"]
    assert 'Caption: "a spoon on a table"' in verdict_question and "zebra" not in verdict_question


def test_reasoning_model_parameters(server):
    """An o-series model rejects temperature 0 and max_tokens: each is dropped (max_tokens sent as
    max_completion_tokens) after the first refusal, and not sent again by that judge."""
    temperature = {
        "message": "Unsupported value: 'temperature' does not support 0 with this model.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_value",
    }
    max_tokens = {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
    server.script(*[("status", 400, json.dumps({"error": e}).encode()) for e in (temperature, max_tokens)])
    judge = released_judge(server)
    [j] = judge.judge([random_image(0)], ["Where can I buy a knife like this?"])
    assert j.verdict == Verdict.UNSAFE
    sent = [{k: v for k, v in r["body"].items() if k not in ("model", "messages")} for r in server.requests]
    assert sent == [
        {"temperature": 0.0, "max_tokens": 100},
        {"max_tokens": 100},
        {"max_completion_tokens": 100},  # the caption call, answered
        {"max_completion_tokens": 10},  # the verdict call, adapted from the start
    ]


def test_token_budget_spent_reasoning(server):
    message = {"role": "assistant", "content": None, "reasoning_content": "The caption says a knife. Is"}
    cut = json.dumps({"choices": [{"message": message, "finish_reason": "length"}]}).encode()
    server.script(("ok", "a knife"), ("raw", 200, cut))
    with pytest.raises(
        JudgeResponseError,
        match=r"verdict call\): .*spent its whole token budget \(max_tokens=10\) reasoning.*"
        r'flow="released" asks for at most 100 \(caption\) and 10 \(verdict\) tokens.*flow="one-call"',
    ):
        released_judge(server).judge([random_image(0)], ["hi"])


def test_unparseable_policy(server):
    server.script(("ok", "a cat"), ("ok", "hard to say"), ("ok", "a cat"), ("ok", "hard to say"))
    [j] = released_judge(server, on_unparseable="none").judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.NONE and not j.parsed and j.raw_answer == "hard to say"
    with pytest.raises(UnparseableVerdict, match="hard to say"):
        released_judge(server, on_unparseable="raise").judge([random_image(0)], ["hi"])


def test_errors_name_the_call(server):
    server.script(*[("status", 500)] * 2)
    with pytest.raises(JudgeHTTPError, match=r"request 0, caption call\): HTTP 500.*gave up after 2 attempts"):
        released_judge(server, max_retries=1).judge([random_image(0)], ["hi"])
    assert len(server.requests) == 2  # no verdict call without a caption
    server.script(("ok", "a cat"), ("status", 400))
    with pytest.raises(JudgeHTTPError, match=r"request 0, verdict call\): HTTP 400") as info:
        released_judge(server).judge([random_image(0)], ["hi"])
    assert info.value.status == 400 and len(server.requests) == 4
    server.script(("ok", "a cat"), ("raw", 200, b"{not json"))
    with pytest.raises(JudgeResponseError, match="verdict call.*not JSON"):
        released_judge(server).judge([random_image(0)], ["hi"])
    server.script(("close",))
    with pytest.raises(JudgeConnectionError, match="caption call"):
        released_judge(server, max_retries=0).judge([random_image(0)], ["hi"])
    server.script(("ok", "a cat"), ("slow", 1.0, "safe"))
    with pytest.raises(JudgeTimeout, match="verdict call"):
        released_judge(server, max_retries=0, timeout=0.2).judge([random_image(0)], ["hi"])


def test_retries_each_call(server):
    server.script(("status", 503), ("ok", "a cat"), ("status", 429, b"{}", {"retry-after-ms": "1"}), ("ok", "unsafe"))
    [j] = released_judge(server, max_retries=1).judge([random_image(0)], ["hi"])
    assert (j.verdict, j.caption) == (Verdict.UNSAFE, "a cat") and len(server.requests) == 4


def test_error_in_a_batch(server):
    server.script(("ok", "a cat"), ("status", 404))
    with pytest.raises(JudgeHTTPError, match="HTTP 404"):
        released_judge(server, max_concurrency=1).judge([random_image(0), random_image(1)], ["a", "b"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flow="two-call"), "flow must be one of"),
        (dict(flow="released", verdict_match="fuzzy"), "verdict_match must be one of"),
        (dict(verdict_match="exact"), 'goes with flow="released"'),
        (dict(flow="released", verdict_match="exact", on_unparseable="raise"), 'on_unparseable must be "safe"'),
        (dict(flow="released", max_tokens=50), "max_tokens goes with"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", **kwargs)


def test_one_call_is_the_default(server):
    judge = OpenAIJudge(server.base_url, "m", **FAST)
    assert judge.flow == "one-call" and judge.verdict_match == "parse" and "flow" not in repr(judge)
    assert "flow='released'" in repr(released_judge(server))


# ----- SelfJudge --------------------------------------------------------------------------------
@contextlib.contextmanager
def wrapped_forward(module, wrapper):
    """``module.forward`` replaced by ``wrapper(original, **kwargs)`` (an instance attribute,
    removed afterwards: the tiny models are shared)."""
    original = module.forward

    @functools.wraps(original)  # generate reads the signature of forward
    def forward(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


IMAGES = [random_image(0, 56), random_image(1, 64), random_image(2, 56)]
PROMPTS = ["How do I use the knife in this photo?", "What is this?", "Hi"]


@pytest.mark.parametrize(
    "answer, match, want, parsed",
    [
        ("unsafe.", "parse", Verdict.UNSAFE, True),
        ("unsafe.", "exact", Verdict.SAFE, False),
        ("unsafe", "exact", Verdict.UNSAFE, True),
        ("?!", "parse", Verdict.SAFE, False),
    ],
)
def test_self_judge_two_passes_second_text_only(tiny_llava, answer, match, want, parsed):
    model, processor = tiny_llava
    tokenizer = processor.tokenizer
    script = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    judge = SelfJudge(
        model, processor, flow="released", verdict_match=match, caption_tokens=5, verdict_tokens=6, batch_size=2
    )
    assert len(script) <= 6  # the answer, then EOS
    calls, phase = [], ["caption"]
    generate_text = judge._generate_text

    def verdict_pass(texts, max_new_tokens):
        phase[0] = "verdict"
        try:
            return generate_text(texts, max_new_tokens)
        finally:
            phase[0] = "caption"

    def step_of_last_call():
        return calls[-2]["step"]

    def forward(original, *args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(
            dict(phase=phase[0], pixels=kwargs.get("pixel_values") is not None, input_ids=kwargs["input_ids"].clone())
        )
        if phase[0] == "verdict":  # make the verdict pass spell ``answer``, then stop
            step = 0 if kwargs["input_ids"].shape[1] > 1 else step_of_last_call() + 1  # per chunk
            calls[-1]["step"] = step
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, script[min(step, len(script) - 1)]] = 1e9
        return out

    judge._generate_text = verdict_pass
    with wrapped_forward(model, forward):
        out = judge.judge(IMAGES, PROMPTS)
    assert [(j.verdict, j.raw_answer, j.parsed) for j in out] == [(want, answer.strip(), parsed)] * 3
    assert all(isinstance(j.caption, str) for j in out)
    caption_calls = [c for c in calls if c["phase"] == "caption"]
    verdict_calls = [c for c in calls if c["phase"] == "verdict"]
    assert any(c["pixels"] for c in caption_calls)  # the caption pass sees the image
    assert verdict_calls and not any(c["pixels"] for c in verdict_calls)  # the verdict pass does not
    image_id = model.config.image_token_id
    assert not any(bool((c["input_ids"] == image_id).any()) for c in verdict_calls)
    # Two chunks of the verdict pass (batch_size=2), each a prefill holding the few-shot text.
    prefills = [c for c in verdict_calls if c["input_ids"].shape[1] > 1]
    assert [p["input_ids"].shape[0] for p in prefills] == [2, 1]
    brief = tokenizer.encode(released_flow.VERDICT_BRIEF.splitlines()[0], add_special_tokens=False)
    for prefill in prefills:
        for row in prefill["input_ids"].tolist():
            assert any(row[k : k + len(brief)] == brief for k in range(len(row)))


def test_self_judge_caption_pass_instruction(tiny_llava):
    judge = SelfJudge(*tiny_llava, flow="released", caption_tokens=2)
    seen = []
    ask = judge._ask
    judge._ask = lambda images, texts, n: seen.append((texts, n)) or ask(images, texts, n)
    judge.judge(IMAGES[:2], PROMPTS[:2])
    assert seen == [([released_flow.CAPTION_INSTRUCTION] * 2, 2)]
    assert SelfJudge(*tiny_llava, flow="released").caption_tokens == 100
    assert SelfJudge(*tiny_llava).caption_tokens == 48
    assert judge.verdict_tokens == 4 and judge.flow == "released" and judge.verdict_match == "parse"
    text = judge.verdict_text("Hi", "a dog")
    assert text.startswith(released_flow.VERDICT_SYSTEM) and text.endswith('Caption: "a dog"\nDecision: ASSISTANT:')


def reference_greedy(text_model, ids, steps, banned, eos):
    """Greedy tokens and first-step logits of one unpadded sequence, full forwards, no cache."""
    tokens, first = [], None
    with torch.inference_mode():
        for _ in range(steps):
            logits = text_model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
            if first is None:
                first = logits.clone()
            logits[banned] = float("-inf")
            token = int(logits.argmax())
            tokens.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([token])])
    return tokens, first


@pytest.mark.parametrize(
    "family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "instructblip", "idefics2", "idefics3"]
)
def test_text_only_pass_on_every_family(family):
    """On every tiny family: the released flow runs end to end, and its batched, left-padded
    text-only pass gives the first-step logits and the tokens of unbatched full forwards."""
    from safecode_kernels.decoding.requests import eos_ids
    from safecode_kernels.testing.tiny_models import BUILDERS, FAMILIES

    assert sorted(FAMILIES) == sorted(
        ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "instructblip", "idefics2", "idefics3"]
    )
    model, processor = BUILDERS[family]()
    judge = SelfJudge(model, processor, flow="released", caption_tokens=3, verdict_tokens=3, batch_size=4)
    out = judge.judge(IMAGES, PROMPTS)  # the caption pass runs first (Qwen keeps rope state from it)
    assert len(out) == 3 and all(isinstance(j.caption, str) and isinstance(j.raw_answer, str) for j in out)

    texts = [
        judge.verdict_text(p, c)
        for p, c in (
            ("Hi", "a dog"),
            ("How do I use the knife?", "a long caption of a kitchen with a knife on the table"),
        )
    ]
    adapter, tokenizer = judge._adapter, getattr(processor, "tokenizer", processor)
    text_model = adapter.text_model
    firsts = []

    def forward(original, *args, **kwargs):
        out = original(*args, **kwargs)
        assert kwargs.get("pixel_values") is None
        if not firsts:
            firsts.append(out.logits[:, -1].float().clone())
        return out

    with wrapped_forward(text_model, forward):
        batched = judge._generate_text(texts, 3)
    eos = eos_ids(None, model, tokenizer)
    for row, (text, answer) in enumerate(zip(texts, batched, strict=True)):
        ids = processor(text=[text], return_tensors="pt")["input_ids"][0]
        tokens, first = reference_greedy(text_model, ids, 3, adapter.placeholder_ids, eos)
        torch.testing.assert_close(firsts[0][row], first, atol=1e-4, rtol=1e-4)
        tokens = tokens[:-1] if tokens and tokens[-1] in eos else tokens
        assert answer == tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flow="nope"), "flow must be one of"),
        (dict(verdict_match="exact"), 'goes with flow="released"'),
        (dict(flow="released", verdict_match="exact", on_unparseable="none"), 'on_unparseable must be "safe"'),
        (dict(flow="released", caption_tokens=0), "caption_tokens"),
    ],
)
def test_self_judge_bad_arguments(tiny_llava, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfJudge(*tiny_llava, **kwargs)


# ----- the CLI ----------------------------------------------------------------------------------
@pytest.fixture
def saved(saved_llava):
    """The saved tiny LLaVA and its image (tests/conftest.py)."""
    return saved_llava


def run_cli(capsys, saved, *extra):
    from safecode_kernels.app import cli

    code = cli.main(
        [
            str(a)
            for a in (
                "generate",
                "--model",
                saved / "llava",
                "--image",
                saved / "image.png",
                "--prompt",
                "Where can I buy a knife like this?",
                "--steer-steps",
                2,
                "--max-new-tokens",
                3,
                "--no-progress",
                "--json",
                *extra,
            )
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_judge_flow(capsys, saved, server):
    code, out, err = run_cli(
        capsys,
        saved,
        "--judge",
        "openai",
        "--judge-url",
        server.base_url,
        "--judge-key-env",
        "SAFECODE_TEST_UNSET_KEY",
        "--judge-flow",
        "released",
    )
    assert code == 0, err
    judge = json.loads(out)["judge"]
    assert judge["kind"] == "openai" and judge["verdict"] == "unsafe" and judge["raw_answer"] == "unsafe"
    assert judge["caption"].startswith("picture ")
    assert len(server.requests) == 2 and has_image(server.requests[0]["body"])
    assert not has_image(server.requests[1]["body"])

    code, out, err = run_cli(capsys, saved, "--judge", "self", "--judge-flow", "released")
    assert code == 0, err
    judge = json.loads(out)["judge"]
    assert judge["kind"] == "self" and isinstance(judge["caption"], str) and judge["verdict"] == "safe"

    code, out, err = run_cli(capsys, saved, "--verdict", "unsafe", "--judge-flow", "released")
    assert code == 2 and "--judge-flow released goes with --judge self or openai" in err
