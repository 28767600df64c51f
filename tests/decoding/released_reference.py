"""An independent reading of the released SafeCoDe loop: one request at a time, no cache, no
batching, plain Python over lists, written from the released code's description (not from the
package's ``released.py``). Only the prompt encoding (``prepare``) and the uncached forward
(``full_forward``) are shared with the package, as in the naive oracle.
"""

from __future__ import annotations

import dataclasses

import torch

from safecode_kernels import safecode_step
from safecode_kernels.decoding.requests import prepare
from safecode_kernels.params import SteeringParams
from safecode_kernels.recipes import ReleasedRecipe
from safecode_kernels.refusal import RefusalVocabulary


@dataclasses.dataclass
class ReferenceAnswer:
    tokens: list[int]
    phrase: str | None = None  # the forced phrase (unsafe)
    early_stop: bool = False  # the safe path stopped before steer_steps tokens
    guarded: bool = False  # the corruption guard dropped tokens
    steered: list[int] = dataclasses.field(default_factory=list)  # tokens the steering produced


def released_reference(
    model,
    processor,
    images,
    prompts,
    verdicts,
    *,
    recipe: ReleasedRecipe,
    steer_steps: int,
    family: str,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    **kwargs,
) -> list[ReferenceAnswer]:
    tok = processor.tokenizer
    encoded = {p: tok.encode(p, add_special_tokens=False) for p in recipe.phrase_list}
    refusal = sorted({i for ids in encoded.values() for i in ids})
    setup = prepare(
        model,
        processor,
        images,
        prompts,
        verdicts,
        steer_steps=steer_steps,
        refusal=RefusalVocabulary(refusal),
        max_new_tokens=max_new_tokens or 64,
        **kwargs,
    )
    adapter = setup.adapter
    banned = adapter.placeholder_ids
    eos = setup.eos_ids
    answers = []
    with torch.inference_mode():
        for request, verdict in zip(setup.requests, verdicts):
            prompt_ids = request.input_ids[None].to(adapter.input_device)

            def logits(tokens, vision, noised=False, prompt_ids=prompt_ids):
                ids = torch.cat([prompt_ids, prompt_ids.new_tensor([tokens])], dim=1) if tokens else prompt_ids
                row = adapter.full_forward(ids, vision)[0].float().clone()
                row[banned] = 0.0 if noised else float("-inf")
                return row

            def ended(tokens):
                return bool(tokens) and tokens[-1] in eos

            answer = ReferenceAnswer([])
            out = answer.tokens
            unsafe = verdict == "unsafe"
            if verdict == "none" or steer_steps == 0:
                pass
            elif unsafe and steer_steps >= 2:
                real, noised = logits([], request.real), logits([], request.noised, noised=True)
                p = torch.softmax(real - recipe.alpha * noised, dim=-1).tolist()
                scored = [
                    (sum(p[i] for i in ids if i < len(p)), phrase)
                    for phrase, ids in ((ph, encoded[ph]) for ph in recipe.phrase_list)
                    if ids
                ]
                top = sorted(scored, key=lambda pair: -pair[0])[: recipe.top_k]  # sorted() is stable
                preferred = [ph for _, ph in top if any(k in ph.lower() for k in recipe.keywords)]
                chosen = preferred[0] if preferred and recipe.prefer_keywords else top[0][1]
                answer.phrase = chosen
                for token in encoded[chosen][:steer_steps]:
                    out.append(token)
                    if ended(out) or (max_new_tokens and len(out) >= max_new_tokens):
                        break
            else:
                for step in range(steer_steps):
                    real, noised = logits(out, request.real), logits(out, request.noised, noised=True)
                    p = torch.softmax(real - recipe.alpha * recipe.safe_alpha_factor * noised, dim=-1)
                    for i in refusal:
                        p[i] = p[i] * recipe.suppress_factor
                    if float(p.sum()) > 0:
                        p = p / p.sum()
                    if step == 0:
                        first, second = torch.topk(p, 2).indices.tolist()
                        quoted = recipe.skip_quote_first and tok.decode([first]).strip() in recipe.quote_marks
                        token = second if quoted else first
                    elif do_sample:
                        weights = torch.softmax(torch.log(p + 1e-10) / recipe.safe_temperature, dim=-1)
                        token = int(torch.multinomial(weights, 1, generator=generator))
                    else:
                        token = int(p.argmax())
                    out.append(token)
                    if ended(out) or (max_new_tokens and len(out) >= max_new_tokens):
                        break
                    words = tok.decode(out).split()
                    capitalised = len(words) >= 2 and len(words[0]) >= 2 and words[0][0].isupper()
                    if recipe.early_stop and step >= 1 and capitalised:
                        answer.early_stop = step + 1 < steer_steps
                        break
            answer.steered = list(out)
            room = not ended(out) and not (max_new_tokens and len(out) >= max_new_tokens)
            if recipe.corruption_guard and out and room:
                text = tok.decode(out, skip_special_tokens=True)
                if any(m in text for m in recipe.corruption_markers):
                    keep = 0 if "|" in tok.decode(out[:1], skip_special_tokens=True) else 1
                    answer.guarded = keep < len(out)
                    del out[keep:]
            limit = max_new_tokens or len(out) + recipe.length_cap(family, unsafe)
            temperature, top_p = recipe.continuation_safe if verdict == "safe" else recipe.continuation_other
            plain = SteeringParams(
                alpha=0.0,
                sensitive_top_k=0,
                boost=0.0,
                suppress=0.0,
                temperature=temperature if do_sample else 0.0,
                top_p=top_p if do_sample else 1.0,
            )
            while len(out) < limit and not ended(out):
                real = logits(out, request.real)
                if do_sample:
                    zeros = torch.zeros_like(real)
                    token = int(safecode_step(real[None], zeros[None], [0], [], plain, generator, "torch").tokens[0])
                else:
                    token = int(real.argmax())
                out.append(token)
            answers.append(answer)
    return answers
