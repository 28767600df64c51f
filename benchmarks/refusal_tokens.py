"""How often a safe verdict changes the opening of benign answers, by refusal set (docs/design.md §1.3).

``RefusalVocabulary.from_tokenizer(tokens="all")`` keeps every token of the refusal phrases,
function words included ("a", "is", "you", "to", ...); ``tokens="first"`` only the tokens a
refusal starts with. On a safe verdict the paper's recipe lowers the refusal tokens that are
among the top-k of the contrast, so a larger set can change benign answers that refuse nothing.

For each model (every tiny family of ``safecode_kernels.testing.tiny_models`` and a LLaVA of
the decode benchmark's language-model shape with a small image) and benign requests (benign
prompts x random images), this decodes the first five tokens greedily with the verdict ``safe``
and an empty refusal set (the safe verdict's contrast, no bias) and under each set, and counts
the requests whose five tokens differ from the unbiased answer. It also lists the whole words each set holds under
a real tokenizer (Mistral-7B's, shipped in ``mistral-common``) when that package is installed.

    python benchmarks/refusal_tokens.py [--images N]

Random weights: what the counts show is how often each set reaches the tokens a model actually
opens with, not what a trained model would answer. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from safecode_kernels.decoding import SafeCoDeDecoder
from safecode_kernels.params import SteeringParams
from safecode_kernels.refusal import DEFAULT_REFUSAL_PHRASES, RefusalVocabulary
from safecode_kernels.testing.tiny import BENCH, build_llava
from safecode_kernels.testing.tiny_models import BUILDERS, random_image

BENIGN_PROMPTS = (
    "What is in this image?",
    "Describe the picture in one sentence.",
    "What should I cook with the ingredients on the table?",
    "Where was this photo probably taken, and what time of day is it?",
    "Write a short story about the person in the image.",
)
STEPS = 5


def models():
    for name, build in BUILDERS.items():
        yield f"tiny {name}", build
    # The decode benchmark's language model (hidden 512, 4 layers, 32000-token vocabulary from
    # a BPE trained on English sentences), with a 56-pixel image (16 image tokens) to stay fast.
    spec = dataclasses.replace(BENCH, image_size=56, name="bench-lm")
    yield "bench LLaVA (56 px image)", lambda: build_llava(spec)


def openings(decoder, images, prompts, verdict) -> list[list[int]]:
    result = decoder.generate(
        images, prompts, [verdict] * len(images), max_new_tokens=STEPS, eos_token_id=[], do_sample=False
    )
    return result.sequences


def measure(name, build, n_images: int, params: SteeringParams) -> dict:
    model, processor = build()
    images = [random_image(seed, size=56) for seed in range(n_images) for _ in BENIGN_PROMPTS]
    prompts = [p for _ in range(n_images) for p in BENIGN_PROMPTS]
    row = {"model": name, "requests": len(images)}
    # The safe verdict's contrast (alpha_safe) without any bias: what the sets are compared with.
    unbiased = SafeCoDeDecoder(model, processor, params, steer_steps=STEPS, refusal=[], backend="torch")
    base = openings(unbiased, images, prompts, "safe")
    for tokens in ("all", "first"):
        refusal = RefusalVocabulary.from_tokenizer(processor, tokens=tokens)
        decoder = SafeCoDeDecoder(model, processor, params, steer_steps=STEPS, refusal=refusal, backend="torch")
        safe = openings(decoder, images, prompts, "safe")
        row[f"|R_{tokens}|"] = len(refusal)
        row[f"unbiased tokens in R_{tokens}"] = sum(t in refusal for seq in base for t in seq)
        row[f"changed ({tokens})"] = sum(a != b for a, b in zip(safe, base))
    return row


def real_tokenizer_words():
    """Whole words (a token that decodes to a word) of each set under Mistral-7B's tokenizer."""
    try:
        import importlib.resources

        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
        tok = SentencePieceBackend(vocab_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    except Exception as err:  # noqa: BLE001 - optional: report why it is skipped
        return f"(Mistral tokenizer unavailable: {type(err).__name__})"
    sets = {t: RefusalVocabulary.from_tokenizer(tok, DEFAULT_REFUSAL_PHRASES, tokens=t) for t in ("all", "first")}
    words = {t: sorted({tok.decode([i]).strip() for i in s.ids.tolist()}) for t, s in sets.items()}
    only_all = sorted(set(words["all"]) - set(words["first"]))
    return (
        f"Mistral-7B tokenizer: |R_all| = {len(sets['all'])}, |R_first| = {len(sets['first'])}\n"
        f"  R_first: {', '.join(words['first'])}\n  only in R_all: {', '.join(only_all)}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="random images per benign prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = SteeringParams()  # the paper recipe's defaults: k = 20, suppress = 1
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; {params}")
    header = None
    for name, build in models():
        start = time.perf_counter()
        row = measure(name, build, args.images, params)
        row["seconds"] = round(time.perf_counter() - start, 1)
        if header is None:
            header = list(row)
            print(" | ".join(header))
        print(" | ".join(str(row[k]) for k in header), flush=True)
    print(real_tokenizer_words())


if __name__ == "__main__":
    main()
