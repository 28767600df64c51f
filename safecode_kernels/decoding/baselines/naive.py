"""The naive SafeCoDe loop: the correctness oracle and the slowest baseline (docs/design.md §3, §6).

One request at a time, no batching, no padding, no KV cache, no prefix sharing: every step
runs full forward passes over the whole sequence (real then noised while steering, real
alone afterwards), letting the model compute its own positions.
"""

from __future__ import annotations

import torch

from ..requests import prepare
from ..results import GenerationResult, Recorder


def naive_safecode_generate(
    model, processor, images, prompts, verdicts, *, return_logits: bool = False, **kwargs
) -> GenerationResult:
    """SafeCoDe generation the slow, obvious way; same inputs and outputs as
    :meth:`SafeCoDeDecoder.generate` plus the decoder's settings (``params``, ``steer_steps``,
    ``noise_std``, ``seed``, ``refusal``, ``backend``) as keyword arguments.

    Example::

        oracle = sk.naive_safecode_generate(model, processor, [image], ["What is this?"], ["safe"],
                                            steer_steps=5, max_new_tokens=32)
    """
    setup = prepare(model, processor, images, prompts, verdicts, **kwargs)
    adapter, recorder = setup.adapter, Recorder(len(setup.requests), return_logits)
    calls = 0
    with torch.inference_mode():
        for i, request in enumerate(setup.requests):
            ids = request.input_ids[None].to(adapter.input_device)
            tokens = recorder.sequences[i]
            while not setup.done(i, tokens):
                real = adapter.full_forward(ids, request.real)
                if len(tokens) < setup.steer_steps:
                    noised = adapter.full_forward(ids, request.noised)
                    calls += 2
                    out = setup.steer(real, noised, [i], return_logits)
                    token = int(out.tokens[0])
                    mass = (float(out.refusal_mass[0][0]), float(out.refusal_mass[1][0]))
                    recorder.add(i, token, real[0], noised[0], out.logits[0] if return_logits else None, mass)
                else:
                    calls += 1
                    token = int(setup.choose(real)[0])
                    recorder.add(i, token, real[0])
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return recorder.result(setup.tokenizer, {"forward_calls": calls})
