"""The sequential two-cache SafeCoDe loop: how contrastive-decoding codebases usually do it.

One request at a time; each branch has its own KV cache and its own forward per step (real,
then noised), with the model computing positions itself. No batching, no prefix sharing.
A baseline for the benchmarks and a second oracle for the cache path.
"""

from __future__ import annotations

import torch

from ..kv_cache import new_cache
from ..requests import prepare
from ..results import GenerationResult, Recorder


def two_cache_safecode_generate(
    model, processor, images, prompts, verdicts, *, return_logits: bool = False, **kwargs
) -> GenerationResult:
    """Same inputs and outputs as :func:`naive_safecode_generate`.

    Example::

        result = sk.two_cache_safecode_generate(model, processor, [image], ["What is this?"], ["unsafe"])
    """
    setup = prepare(model, processor, images, prompts, verdicts, **kwargs)
    adapter, recorder = setup.adapter, Recorder(len(setup.requests), return_logits)
    calls = 0
    with torch.inference_mode():
        for i, request in enumerate(setup.requests):
            ids = request.input_ids[None].to(adapter.input_device)
            steering = setup.steer_steps > 0
            cache_real = new_cache(model)
            real = adapter.forward(ids, cache=cache_real, vision=request.real)
            if steering:
                cache_noised = new_cache(model)
                noised = adapter.forward(ids, cache=cache_noised, vision=request.noised)
            calls += 1 + steering
            tokens = recorder.sequences[i]
            while True:
                if steering:
                    out = setup.steer(real, noised, [i], return_logits)
                    token = int(out.tokens[0])
                    mass = (float(out.refusal_mass[0][0]), float(out.refusal_mass[1][0]))
                    recorder.add(i, token, real[0], noised[0], out.logits[0] if return_logits else None, mass)
                else:
                    token = int(setup.choose(real)[0])
                    recorder.add(i, token, real[0])
                if setup.done(i, tokens):
                    break
                step_ids = ids.new_tensor([[token]])
                real = adapter.forward(step_ids, cache=cache_real)
                calls += 1
                if steering and len(tokens) < setup.steer_steps:
                    noised = adapter.forward(step_ids, cache=cache_noised)
                    calls += 1
                elif steering:
                    steering, cache_noised = False, None  # free the noised branch
    return recorder.result(setup.tokenizer, {"forward_calls": calls})
