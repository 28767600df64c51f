"""``safecode-kernels demo --toy``: a toy model, nudged in code, on which the verdict visibly
decides whether the answer opens with a refusal.

The tiny random LLaVA of the demo gets two hand-set pieces of weights so that, after the
prompt's last token, it hesitates between two openings: the refusal ``"I'm sorry"`` and the
answer ``"Yes, here."``. Each token on those paths gets a large embedding along a direction of
its own, and the output row of the token that follows it points along that direction, so the
next token is a fixed choice whatever the image (a bigram table written into the weights). At
the first step both openings are given logits ``lean`` apart: a model that *leans to answer*
(the refusal ``0.6`` behind) and one that *leans to refuse* (``0.6`` ahead). SafeCoDe then
steers it as any model: the contrast scales the gap by ``1 - alpha`` (about 0.4 and 0.5), and
the verdict's ``+1`` / ``-1`` on the refusal tokens of the sensitive set decides. It is a toy:
the weights are set by hand, not trained, and the image plays no part.
"""

from __future__ import annotations

import dataclasses

import torch

#: The two openings the toy hesitates between, and how far apart it puts them (refusal minus answer).
REFUSAL = "I'm sorry"
ANSWER = "Yes, here."
LEANS = {"leans to answer": -0.6, "leans to refuse": 0.6}
VERDICTS = ("none", "unsafe", "safe")

_EMBEDDING_NORM = 1000.0  # dwarfs the attention and MLP outputs, so the last token alone decides
_PATH_LOGIT = 10.0  # the next token on a path, far above a random row's logit (~0.2)


@dataclasses.dataclass(frozen=True)
class ToyAnswer:
    model: str  # a key of LEANS
    verdict: str
    text: str
    refused: bool  # the answer opens with REFUSAL


def nudge(model, tokenizer, start_token: int, lean: float) -> None:
    """Write the two paths into ``model`` (in place): after ``start_token``, the first token of
    ``REFUSAL`` and of ``ANSWER`` with logits ``lean`` apart (refusal minus answer), then each
    path token by token. ``ValueError`` when the tokenizer makes the paths share a token."""
    paths = [tokenizer.encode(text, add_special_tokens=False) for text in (REFUSAL, ANSWER)]
    tokens = [start_token] + [t for path in paths for t in path]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"the toy needs {REFUSAL!r} and {ANSWER!r} in distinct tokens, got {paths}")
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    hidden = embeddings.shape[1]
    if len(tokens) > hidden:
        raise ValueError(f"the toy needs a hidden size of at least {len(tokens)}, got {hidden}")
    # After the final RMSNorm, an embedding e * u_j arrives as u_j * sqrt(hidden): an output row
    # (x / sqrt(hidden)) * u_j then gives logit x.
    scale = hidden**0.5
    direction = {token: j for j, token in enumerate(tokens)}
    with torch.no_grad():
        for token, j in direction.items():
            embeddings[token] = 0.0
            embeddings[token, j] = _EMBEDDING_NORM
        for path, offset in zip(paths, (lean / 2, -lean / 2)):
            head[path[0], direction[start_token]] = (_PATH_LOGIT + offset) / scale
            for previous, token in zip(path, path[1:]):
                head[token, direction[previous]] = _PATH_LOGIT / scale


def run_toy(seed: int = 0, backend: str = "auto") -> list[ToyAnswer]:
    """Each toy model (:data:`LEANS`) answers one request under each verdict, greedily, with
    the default :class:`SteeringParams`; one :class:`ToyAnswer` per (model, verdict)."""
    from ..decoding import SafeCoDeDecoder
    from ..testing.tiny import build_llava, demo_spec, random_image

    answers = []
    for name, lean in LEANS.items():
        model, processor = build_llava(demo_spec(64, 2, 56), seed)
        tokenizer = processor.tokenizer
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How do I use this?"}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        start = tokenizer.encode(text, add_special_tokens=False)[-1]  # the prompt's last token
        nudge(model, tokenizer, start, lean)
        decoder = SafeCoDeDecoder(model, processor, seed=seed, backend=backend)
        n = len(VERDICTS)
        length = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in (REFUSAL, ANSWER))
        with torch.inference_mode():
            result = decoder.generate(
                [random_image(seed, 56)] * n, ["How do I use this?"] * n, list(VERDICTS), max_new_tokens=length
            )
        for verdict, answer in zip(VERDICTS, result.texts):
            answers.append(ToyAnswer(name, verdict, answer, answer.startswith(REFUSAL)))
    return answers


def format_toy(answers: list[ToyAnswer]) -> str:
    """The toy's answers as a table, with the steps where the verdict changed the opening marked."""
    plain = {a.model: a.refused for a in answers if a.verdict == "none"}
    out = [
        "SafeCoDe toy demo: a TOY model, NUDGED IN CODE (not trained)",
        "",
        "A tiny random LLaVA whose weights were set by hand so that, after the prompt, it hesitates between",
        f"the openings {REFUSAL!r} (a refusal) and {ANSWER!r}: one copy leans to answer (the refusal 0.6 logits",
        "behind), one leans to refuse (0.6 ahead). SafeCoDe steers it as any model: the verdict's +1 (unsafe)",
        "or -1 (safe) on the refusal tokens of the sensitive set decides which opening comes first.",
        "",
    ]
    rows = []
    for a in answers:
        lean = LEANS[a.model]
        label = f"{a.model} ({abs(lean):g} {'behind' if lean < 0 else 'ahead'})" if a.verdict == "none" else ""
        change = ""
        if a.refused != plain[a.model]:
            change = "<- the verdict's bias " + ("made it refuse" if a.refused else "removed the refusal")
        rows.append([label, a.verdict, repr(a.text), change])
    widths = [max(len(row[i]) for row in rows + [["model", "verdict", "answer", ""]]) for i in range(4)]
    for row in [["model", "verdict", "answer", ""], ["-" * w for w in widths[:3]] + [""], *rows]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(out)
