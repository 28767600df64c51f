"""``safecode-kernels demo``: the whole SafeCoDe pipeline on a tiny random LLaVA, no files needed.

It builds a small randomly initialised LLaVA-1.5 in code (:mod:`safecode_kernels.testing.tiny`),
runs a few requests with mixed verdicts through the naive loop (two full forward passes per
steered step, no cache, one request at a time) and through the fused decoder (both branches
of every request as one batch with a KV cache), and reports that the two agree token for
token, how long each took, and what the steering did at each steered step (refusal
probability mass before and after the verdict's bias).

The model is random, so the generated words are noise: the point is the mechanics and the
speed. ``safecode-kernels generate`` runs a real model.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

#: The demo's requests: (prompt, verdict, image side in pixels). Mixed verdicts and lengths.
REQUESTS = (
    ("How do I use what is shown in this picture?", "unsafe", 64),
    ("What is in this image?", "safe", 80),
    ("Hi", "none", 64),
    ("Tell me about the weapon in the photo, please.", "unsafe", 96),
    ("Describe the scene for a children's book.", "safe", 72),
    ("Is this a kitchen knife?", "none", 64),
)


@dataclasses.dataclass(frozen=True)
class StepView:
    """What the verdict's bias did at one steered step (fused decoder), for the report.

    ``token``: the token chosen from the biased contrast, ``token_text`` its text;
    ``unbiased_token`` / ``unbiased_text``: what the same contrast without the bias would have
    chosen at this step; ``refusal_in_set``: how many refusal tokens are in the sensitive set
    (the only ones the bias reaches); ``refusal`` / ``unbiased_refusal``: whether ``token`` /
    ``unbiased_token`` is a refusal token.
    """

    token: int
    token_text: str
    unbiased_token: int
    unbiased_text: str
    refusal_in_set: int
    refusal: bool
    unbiased_refusal: bool

    @property
    def changed(self) -> bool:
        return self.token != self.unbiased_token


@dataclasses.dataclass
class DemoRequest:
    prompt: str
    verdict: str
    naive_tokens: list[int]
    fused_tokens: list[int]
    steering: list  # SteeringRecord per steered step (fused decoder)
    naive_steering: list
    steps: list[StepView] = dataclasses.field(default_factory=list)  # one per steered step

    @property
    def agree(self) -> bool:
        return self.naive_tokens == self.fused_tokens


@dataclasses.dataclass
class DemoReport:
    model: str
    requests: list[DemoRequest]
    naive_s: float
    fused_s: float
    naive_forwards: int
    fused_forwards: int
    max_logit_diff: float
    settings: dict

    @property
    def agree(self) -> bool:
        return all(r.agree for r in self.requests)

    @property
    def speedup(self) -> float:
        return self.naive_s / self.fused_s if self.fused_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings,
            "agree": self.agree,
            "naive_s": self.naive_s,
            "fused_s": self.fused_s,
            "speedup": self.speedup,
            "naive_forward_calls": self.naive_forwards,
            "fused_forward_calls": self.fused_forwards,
            "max_logit_diff": self.max_logit_diff,
            "requests": [
                {
                    "prompt": r.prompt,
                    "verdict": r.verdict,
                    "agree": r.agree,
                    "naive_tokens": r.naive_tokens,
                    "fused_tokens": r.fused_tokens,
                    "steering": [
                        {
                            **dataclasses.asdict(s),
                            "token_text": v.token_text,
                            "token_without_bias": v.unbiased_token,
                            "token_without_bias_text": v.unbiased_text,
                            "bias_changed_token": v.changed,
                            "refusal_tokens_in_sensitive_set": v.refusal_in_set,
                            "token_is_refusal": v.refusal,
                        }
                        for s, v in zip(r.steering, r.steps)
                    ],
                }
                for r in self.requests
            ],
        }


def run_demo(
    *,
    num_requests: int = 4,
    max_new_tokens: int = 16,
    steer_steps: int = 5,
    hidden_size: int = 256,
    num_layers: int = 4,
    image_size: int = 224,
    seed: int = 0,
    backend: str = "auto",
    noise_std: float = 0.1,
    params=None,
    threads: int | None = 1,
    progress: bool | None = None,
    log=None,
) -> DemoReport:
    """Run the demo and return its :class:`DemoReport` (:func:`format_report` prints it).

    The default model has hidden size 256, 4 layers and 256 image tokens (224-pixel images in
    14-pixel patches). ``threads``: torch threads while it runs (default 1: a model this small
    gains little from more, and on a busy machine spinning threads can make it many times
    slower; ``None`` keeps torch's setting). ``progress``: show tqdm bars (``None``: only on a
    terminal). ``log(line)`` receives progress lines (default: nothing).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        return _run(
            num_requests,
            max_new_tokens,
            steer_steps,
            hidden_size,
            num_layers,
            image_size,
            seed,
            backend,
            noise_std,
            params,
            progress,
            log,
        )
    finally:
        torch.set_num_threads(previous)


def _run(
    num_requests,
    max_new_tokens,
    steer_steps,
    hidden_size,
    num_layers,
    image_size,
    seed,
    backend,
    noise_std,
    params,
    progress,
    log,
) -> DemoReport:
    from tqdm.auto import tqdm

    from ..decoding import SafeCoDeDecoder, naive_safecode_generate
    from ..decoding.noise import noised_views
    from ..params import SteeringParams
    from ..refusal import RefusalVocabulary
    from ..testing.tiny import build_llava, demo_spec, random_image

    if not 1 <= num_requests <= len(REQUESTS):
        raise ValueError(f"num_requests must be in [1, {len(REQUESTS)}], got {num_requests}")
    log = log or (lambda line: None)
    params = params if params is not None else SteeringParams()
    disable = None if progress is None else not progress

    log("building a tiny random LLaVA in code ...")
    model, processor = build_llava(demo_spec(hidden_size, num_layers, image_size), seed)
    refusal = RefusalVocabulary.from_tokenizer(processor.tokenizer)
    chosen = REQUESTS[:num_requests]
    prompts = [p for p, _, _ in chosen]
    verdicts = [v for _, v, _ in chosen]
    images = [random_image(seed + i, size) for i, (_, _, size) in enumerate(chosen)]
    # Both decoders must see the same noised views: draw them once (a per-request naive call
    # would otherwise draw each from the start of the seeded stream).
    noised = noised_views(images, noise_std, seed)
    settings = dict(
        steer_steps=steer_steps, seed=seed, refusal=refusal, backend=backend, params=params, noise_std=noise_std
    )
    kwargs = dict(max_new_tokens=max_new_tokens, return_logits=True)
    decoder = SafeCoDeDecoder(model, processor, **settings)

    with torch.inference_mode():
        # Warm both paths up once (first-call overheads would otherwise land on one of them).
        decoder.generate(images[:1], prompts[:1], verdicts[:1], max_new_tokens=2)
        naive_safecode_generate(model, processor, images[:1], prompts[:1], verdicts[:1], max_new_tokens=2, **settings)

        naive = []
        start = time.perf_counter()
        for i in tqdm(range(num_requests), desc="naive loop", unit="request", disable=disable, leave=False):
            # The naive loop runs one request at a time anyway; one call per request shows progress.
            naive.append(
                naive_safecode_generate(
                    model,
                    processor,
                    [images[i]],
                    [prompts[i]],
                    [verdicts[i]],
                    noised_images=[noised[i]],
                    **settings,
                    **kwargs,
                )
            )
        naive_s = time.perf_counter() - start
        log(f"naive loop: {naive_s:.2f} s")

        start = time.perf_counter()
        fused = decoder.generate(images, prompts, verdicts, noised_images=noised, **kwargs)
        fused_s = time.perf_counter() - start
        log(f"fused decoder: {fused_s:.2f} s")

    max_diff = 0.0
    for i, result in enumerate(naive):
        for name in ("logits", "noised_logits"):
            got, want = getattr(fused, name)[i], getattr(result, name)[0]
            if got.shape == want.shape and got.numel():
                finite = torch.isfinite(want)
                max_diff = max(max_diff, float((got[finite] - want[finite]).abs().max()))
    rows = [
        DemoRequest(
            p,
            v,
            naive[i].sequences[0],
            fused.sequences[i],
            fused.steering[i],
            naive[i].steering[0],
            step_views(fused, i, v, refusal, params, processor.tokenizer),
        )
        for i, (p, v) in enumerate(zip(prompts, verdicts))
    ]
    text = model.config.text_config
    description = (
        f"LLaVA-1.5 architecture, random weights: hidden {text.hidden_size}, {text.num_hidden_layers} "
        f"layers, vocabulary {text.vocab_size}, {(image_size // 14) ** 2} image tokens per image, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, fp32"
    )
    shown = dict(
        steer_steps=steer_steps,
        max_new_tokens=max_new_tokens,
        alpha=params.alpha,
        alpha_safe=params.alpha_safe,
        sensitive_top_k=params.sensitive_top_k,
        boost=params.boost,
        suppress=params.suppress,
        refusal_tokens=len(refusal),
        vocab_size=text.vocab_size,
        backend=_resolved_backend(backend),
        torch_threads=torch.get_num_threads(),
    )
    return DemoReport(
        description,
        rows,
        naive_s,
        fused_s,
        sum(r.stats.get("forward_calls", 0) for r in naive),
        fused.stats.get("forward_calls", 0),
        max_diff,
        shown,
    )


def step_views(result, index: int, verdict: str, refusal, params, tokenizer) -> list[StepView]:
    """Per steered step of request ``index`` of ``result`` (a ``return_logits=True`` result):
    the chosen token, the token the contrast alone would have given (the same step op with
    ``boost = suppress = 0``, on the same logits), and the refusal tokens in the sensitive set."""
    from ..ops import safecode_step

    chosen = [r.token for r in result.steering[index]]
    if not chosen:
        return []
    real, noised = result.logits[index][: len(chosen)], result.noised_logits[index]
    unbiased = safecode_step(
        real, noised, [verdict] * len(chosen), refusal, params.replace(boost=0.0, suppress=0.0), return_logits=True
    )
    z = unbiased.logits  # the contrast (banned tokens at -inf)
    k = min(params.sensitive_top_k, z.shape[-1])
    # The sensitive set: the k largest values of z, ties to the lower id (docs/design.md §2).
    top = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    in_set = refusal.mask(z.shape[-1])[top].sum(-1).tolist() if params.scope == "sensitive" else [len(refusal)] * len(z)
    return [
        StepView(token, token_text(tokenizer, token), u, token_text(tokenizer, u), n, token in refusal, u in refusal)
        for token, u, n in zip(chosen, unbiased.tokens.tolist(), in_set)
    ]


def token_text(tokenizer, token: int) -> str:
    """The token's text, quoted, with control and other non-printable characters escaped as
    ``repr`` escapes them (a random model's tokens must not drive the terminal); a token that
    is part of a character's bytes (it decodes to U+FFFD) is shown as its id's byte piece."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        piece = tokenizer.convert_ids_to_tokens(token)
        return f"<bytes {piece}>" if isinstance(piece, str) else f"<bytes of id {token}>"
    return repr(text)


def _resolved_backend(backend: str) -> str:
    """``backend``, with what ``auto`` picks for CPU tensors spelled out."""
    import os

    from ..ops.dispatch import backend_status

    if backend != "auto":
        return backend
    override = os.environ.get("SAFECODE_BACKEND", "").strip().lower()
    if override and override != "auto":
        return f"{override} (from SAFECODE_BACKEND)"
    return "auto: " + ("cpu" if backend_status()["cpu"] is None else "torch")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _ids(tokens: list[int], limit: int = 8) -> str:
    shown = " ".join(map(str, tokens[:limit]))
    return shown + (" ..." if len(tokens) > limit else "")


def steering_section(report: DemoReport) -> list[str]:
    """Section 3 of the report: what the verdict's bias did at every steered step, each number
    explained in one line."""
    s = report.settings
    k, n_refusal, vocab = s["sensitive_top_k"], s["refusal_tokens"], s["vocab_size"]
    out = [
        "3. What the steering did at each steered step (fused decoder; the naive loop's records are the same).",
        "",
        f"   z          the contrast: real-image logits - alpha * noised-image logits (alpha {s['alpha']:g}, "
        f"{s['alpha_safe']:g} for safe).",
        f"   mass       probability softmax(z) gives the {n_refusal} refusal tokens, before -> after the bias "
        f"(~{n_refusal}/{vocab} = {n_refusal / vocab:.2f}: random).",
        f"   in top-{k:<3} refusal tokens among the {k} largest z (the sensitive set), the only ones biased: "
        f"+{s['boost']:g} unsafe, -{s['suppress']:g} safe.",
        "   token      the token chosen from the biased contrast (greedy), its text quoted with escapes",
        "              (<bytes ..>: a piece of a character's bytes).",
        "   bias       'changed' where the contrast alone would have chosen another token (from -> to), else '-'.",
        "",
    ]
    rows = []
    for i, r in enumerate(report.requests):
        for record, view in zip(r.steering, r.steps):
            rows.append(
                [
                    str(i),
                    r.verdict,
                    str(record.step),
                    f"{record.refusal_mass_before:.3f} -> {record.refusal_mass_after:.3f}",
                    str(view.refusal_in_set),
                    f"{view.token} {_mark(view.token_text, view.refusal)}",
                    _change(view),
                ]
            )
    out += _table(["#", "verdict", "step", "mass", f"in top-{k}", "token", "bias"], rows)
    changed = sum(v.changed for r in report.requests for v in r.steps)
    total = sum(len(r.steps) for r in report.requests)
    if total == 0:
        return out + ["", "   No step was steered (--steer-steps 0): every token is the model's plain choice."]
    out += [
        "",
        f"   The bias changed the chosen token at {changed} of {total} steered steps. The mass moves more where more",
        "   refusal tokens are in the sensitive set, and not at all for 'none'. A small bias moves the choice only",
        "   where a refusal token is close to the top already: luck on a random model; on a trained model, the",
        "   refusal openings of a harmful request are such tokens.",
    ]
    return out


def _mark(text: str, refusal: bool) -> str:
    return f"{text} (refusal)" if refusal else text


def _change(view: StepView) -> str:
    if not view.changed:
        return "-"
    return f"changed: {_mark(view.unbiased_text, view.unbiased_refusal)} -> {_mark(view.token_text, view.refusal)}"


def format_report(report: DemoReport) -> str:
    """The demo's report as readable text (tables)."""
    s = report.settings
    out = [
        "SafeCoDe demo: safety-aware contrastive decoding, naive loop vs fused decoder",
        "",
        f"Model: {report.model}.",
        "NOTE: the model is RANDOMLY INITIALISED (built in code, nothing downloaded), so the words it",
        "generates are noise. The point is the mechanics (both decoders, the steering) and the speed.",
        "",
        f"Settings: steer_steps={s['steer_steps']}, max_new_tokens={s['max_new_tokens']}, greedy, "
        f"alpha={s['alpha']:g} (safe: {s['alpha_safe']:g}), sensitive_top_k={s['sensitive_top_k']}, "
        f"boost={s['boost']:g}, suppress={s['suppress']:g}, {s['refusal_tokens']} refusal tokens, "
        f"step backend {s['backend']}, {s['torch_threads']} torch thread(s).",
        "",
        "1. Token ids generated (naive loop vs fused decoder):",
        "",
    ]
    rows = []
    for i, r in enumerate(report.requests):
        same = sum(a == b for a, b in zip(r.naive_tokens, r.fused_tokens))
        verdict = "yes" if r.agree else f"NO ({same}/{max(len(r.naive_tokens), len(r.fused_tokens))})"
        prompt = r.prompt if len(r.prompt) <= 32 else r.prompt[:29] + "..."
        rows.append([str(i), r.verdict, prompt, str(len(r.fused_tokens)), _ids(r.fused_tokens), verdict])
    out += _table(["#", "verdict", "prompt", "tokens", "fused token ids", "naive == fused"], rows)
    out += [
        "",
        f"   {'All requests agree token for token' if report.agree else 'MISMATCH between the decoders'}; "
        f"largest logit difference {report.max_logit_diff:.1e}.",
        "",
        "2. Time for all requests (after one warm-up call of each):",
        "",
    ]
    out += _table(
        ["decoder", "how", "forward calls", "time"],
        [
            [
                "naive loop",
                "2 full forwards per steered step, no cache, one request at a time",
                str(report.naive_forwards),
                f"{report.naive_s:.2f} s",
            ],
            [
                "fused decoder",
                "both branches of all requests in one batch, KV cache, shared prefix",
                str(report.fused_forwards),
                f"{report.fused_s:.2f} s",
            ],
        ],
    )
    out += [
        "",
        f"   The fused decoder is {report.speedup:.1f}x faster on this machine (one run; the ratio depends",
        "   on the model size, the batch and the load of the machine).",
        "",
    ]
    out += steering_section(report)
    out += [
        "",
        "Next: run a real model from a local folder, e.g.",
        '  safecode-kernels generate --model ./llava-1.5-7b-hf --image photo.jpg --prompt "How do I use this?"',
    ]
    return "\n".join(out)


def main(
    num_requests: int = 4,
    max_new_tokens: int = 16,
    steer_steps: int = 5,
    seed: int = 0,
    backend: str = "auto",
    threads: int | None = 1,
    as_json: bool = False,
    progress: bool | None = None,
) -> int:
    """Run the demo and print the report (or its JSON); 0 when the decoders agree, else 1."""
    import json

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = run_demo(
        num_requests=num_requests,
        max_new_tokens=max_new_tokens,
        steer_steps=steer_steps,
        seed=seed,
        backend=backend,
        threads=threads,
        progress=progress,
        log=None if as_json else log,
    )
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    return 0 if report.agree else 1
