"""The two-branch SafeCoDe decoder for Hugging Face multimodal models (SPEC §3).

Row layout: request ``i`` owns rows ``2i`` (real image) and ``2i + 1`` (noised image) while
steering, and row ``i`` afterwards. Every prompt row is laid out as

    [pad .. pad | text before the image | pad .. pad | image tokens and the rest]
     `------- prefix: P columns -------'  `--------- suffix: S columns --------'

so the prefix columns of all requests end together and can be prefilled once, on the real
rows only, before the cache rows are repeated for the noised branch. The attention mask
skips the padding and positions are counted over the mask, so every row sees exactly the
positions of its own unpadded prompt.
"""

from __future__ import annotations

import dataclasses

import torch

from ..params import SteeringParams
from .adapters import get_adapter
from .kv_cache import cache_nbytes, check_window, is_reserved, merge_rows, new_cache
from .noise import check_noise_std
from ..validation import check_int
from .requests import Setup, prepare, resolve_refusal
from .results import GenerationResult, Recorder
from .small_batch import small_batch_linear


class SafeCoDeDecoder:
    """Generate with SafeCoDe steering for a batch of (image, prompt, verdict) requests.

    Both branches of every request run as one batch of ``2B`` rows with a KV cache; the text
    before the image is prefilled once per request; the first ``steer_steps`` tokens come from
    the fused step op (:func:`safecode_kernels.safecode_step`) on the paired rows, the rest from
    the real rows alone, after the noised rows have been dropped from the cache.

    Args:
        model: a supported ``*ForConditionalGeneration`` model (see :func:`supported_models`:
            LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InstructBLIP, Idefics2, Idefics3).
        processor: its processor (chat template, image processor, tokenizer).
        params: :class:`SteeringParams` of the steered steps (the sampling fields are set by
            :meth:`generate`).
        steer_steps: how many first tokens are steered (0: plain generation).
        noise_std: standard deviation of the noise of the noised view, in [0, 1] pixel space.
        seed: seeds the noised images and the sampling.
        refusal: the refusal token set (a :class:`RefusalVocabulary` or ids); by default built
            from the processor's tokenizer.
        share_prefix: prefill the text before the image once per request (default); ``False``
            runs the whole prompt in both branches (for comparisons).
        min_shared_prefix: share the prefix of a prefill chunk (see ``prefill_chunk_tokens``)
            only when its requests' prefixes hold at least this many tokens together (sharing
            costs one more forward, which a handful of tokens such as ``<s>USER:`` does not
            pay for; the answers are the same either way).
        backend: backend of the step op (``"auto"``: the fastest available where the logits are).
        small_batch: on the CPU in fp32, run the steered steps' linear layers as ``W @ x.T`` when
            they have 2 to 8 rows, so that one weight read serves both branches (PyTorch's
            ``F.linear`` reads the weights once per row there; see ``small_batch.py``).
        prefill_chunk_tokens: the most prompt tokens (rows x columns) one prefill forward takes;
            the prompt batch is split into chunks of whole requests below it (the answers are
            the same). ``None``: ``CPU_PREFILL_TOKENS`` (2048) on the CPU, where large forwards
            page-fault their temporaries in afresh, and no limit elsewhere; ``0``: no limit.

    Example::

        decoder = sk.SafeCoDeDecoder(model, processor, steer_steps=5)
        result = decoder.generate([image_a, image_b], ["How do I use this?", "What is this?"],
                                  ["unsafe", "safe"], max_new_tokens=128)
        print(result.texts[0], result.steering[0][0].refusal_mass_after)
    """

    def __init__(self, model, processor, params: SteeringParams | None = None, steer_steps: int = 5,
                 noise_std: float = 0.1, seed: int = 0, refusal=None, share_prefix: bool = True,
                 backend: str = "auto", min_shared_prefix: int = 32, small_batch: bool = True,
                 prefill_chunk_tokens: int | None = None):
        check_int("steer_steps", steer_steps, 0)
        check_int("min_shared_prefix", min_shared_prefix, 0)
        if prefill_chunk_tokens is not None:
            check_int("prefill_chunk_tokens", prefill_chunk_tokens, 0)
        check_noise_std(noise_std)
        if params is not None and not isinstance(params, SteeringParams):
            raise TypeError(f"params must be a SteeringParams, got {type(params).__name__}")
        self.model = model
        self.processor = processor
        self.adapter = get_adapter(model, processor)
        self.params = params if params is not None else SteeringParams()
        self.steer_steps = steer_steps
        self.noise_std = noise_std
        self.seed = seed
        self.refusal = refusal
        self.share_prefix = share_prefix
        self.min_shared_prefix = min_shared_prefix
        self.small_batch = small_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.backend = backend
        self._refusal_vocabulary = None  # built once, on the first call

    def _refusal(self):
        if self._refusal_vocabulary is None:
            self._refusal_vocabulary = resolve_refusal(self.refusal, self.processor)
        return self._refusal_vocabulary

    def generate(self, images, prompts, verdicts, max_new_tokens: int = 256,
                 max_new_tokens_unsafe: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, noised_images=None, system_prompt=None,
                 chat_template: bool | None = None, eos_token_id=None, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> GenerationResult:
        """Answer every request; see :class:`GenerationResult`.

        ``verdicts``: one of ``"unsafe" | "safe" | "none"`` (or a :class:`Verdict`) per request.
        ``max_new_tokens_unsafe`` caps the answers of unsafe requests (default: ``max_new_tokens``).
        ``noised_images``: the noised views to use instead of drawing them (one per request).
        ``system_prompt`` (one for all, or one per request) goes before the image in the chat
        template; ``chat_template=False``
        uses each prompt as is (it must then contain the processor's image placeholder).
        ``generator`` drives the sampling (default: seeded from the decoder's ``seed``).
        """
        setup = prepare(
            self.model, self.processor, images, prompts, verdicts, params=self.params,
            steer_steps=self.steer_steps, noise_std=self.noise_std, seed=self.seed, refusal=self._refusal(),
            max_new_tokens=max_new_tokens, max_new_tokens_unsafe=max_new_tokens_unsafe, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, noised_images=noised_images,
            system_prompt=system_prompt, chat_template=chat_template, eos_token_id=eos_token_id,
            generator=generator, backend=self.backend, adapter=self.adapter,
        )
        with torch.inference_mode():
            return _decode(setup, self.share_prefix, return_logits, self.min_shared_prefix, self.small_batch,
                           self.prefill_chunk_tokens)


def safecode_generate(model, processor, image, prompt: str, verdict, **kwargs) -> GenerationResult:
    """SafeCoDe generation for one request; ``kwargs`` go to :class:`SafeCoDeDecoder` or
    :meth:`SafeCoDeDecoder.generate`. Returns a :class:`GenerationResult` of one request.

    Example::

        result = sk.safecode_generate(model, processor, image, "What is this?", "safe", max_new_tokens=64)
        print(result.texts[0])
    """
    init_names = ("params", "steer_steps", "noise_std", "seed", "refusal", "share_prefix", "backend",
                  "min_shared_prefix", "small_batch", "prefill_chunk_tokens")
    init = {name: kwargs.pop(name) for name in init_names if name in kwargs}
    if "noised_image" in kwargs:
        kwargs["noised_images"] = [kwargs.pop("noised_image")]
    return SafeCoDeDecoder(model, processor, **init).generate([image], [prompt], [verdict], **kwargs)


@dataclasses.dataclass
class _Layout:
    input_ids: torch.Tensor  # [rows, P + S]
    attention_mask: torch.Tensor  # [rows, P + S]
    prefix: int  # P: columns prefilled once, on the real rows
    vision: dict[str, torch.Tensor]  # pixels of every row, in row order
    vision_parts: list[dict[str, torch.Tensor]]  # the same, one entry per row


def _layout(setup: Setup, width: int, share_prefix: bool) -> _Layout:
    """Left-pad the prefix and the suffix of every prompt separately (see the module doc)."""
    splits = [(r.input_ids, r.prefix_len if share_prefix else 0) for r in setup.requests]
    prefix = max(p for _, p in splits)
    suffix = max(len(ids) - p for ids, p in splits)
    rows, masks, vision = [], [], []
    for (ids, p), request in zip(splits, setup.requests):
        s = len(ids) - p
        pad_p, pad_s = torch.full((prefix - p,), setup.pad_id), torch.full((suffix - s,), setup.pad_id)
        row = torch.cat([pad_p, ids[:p], pad_s, ids[p:]])
        mask = torch.cat([torch.zeros(prefix - p), torch.ones(p), torch.zeros(suffix - s), torch.ones(s)])
        rows += [row] * width
        masks += [mask.long()] * width
        vision += [request.real, request.noised][:width]
    device = setup.adapter.input_device
    return _Layout(torch.stack(rows).to(device), torch.stack(masks).to(device), prefix,
                   setup.adapter.concat_vision(vision), vision)


def _decode(setup: Setup, share_prefix: bool, return_logits: bool, min_shared_prefix: int = 1,
            small_batch: bool = True, prefill_tokens: int | None = None) -> GenerationResult:
    adapter = setup.adapter
    model = adapter.model
    width = 2 if setup.steer_steps > 0 else 1  # rows per request: real (+ noised while steering)
    # Sharing the prefix costs one more (small) forward; it pays once it saves enough tokens.
    shared_tokens = sum(r.prefix_len for r in setup.requests) if share_prefix else 0
    layout = _layout(setup, width, share_prefix and shared_tokens >= max(1, min_shared_prefix))
    positions, next_position = adapter.prompt_positions(layout.input_ids, layout.attention_mask, layout.vision)
    rows, columns = layout.attention_mask.shape
    max_new = max(r.max_new_tokens for r in setup.requests)
    cache = new_cache(model, capacity=columns + max_new)
    check_window(cache, columns + max_new)
    stats = {"prefix_columns": layout.prefix, "prompt_columns": columns, "forward_calls": 0}

    # One attention mask for the whole run: the prompt's, then ones for every generated token;
    # each forward sees a view of its first columns (no per-step concatenation).
    mask = torch.cat([layout.attention_mask, layout.attention_mask.new_ones(rows, max_new)], dim=1)

    # Prefill, in chunks of whole requests (see _requests_per_chunk): the shared prefix on the
    # real rows (no logits needed), its cache rows repeated for both branches, then the rest.
    p, n = layout.prefix, len(setup.requests)
    per_chunk = _requests_per_chunk(prefill_tokens, n, width, columns, layout.input_ids.device)
    if per_chunk < n and not is_reserved(cache):
        per_chunk = n
    parts, part_logits = [], []
    for first in range(0, n, per_chunk):
        last = min(n, first + per_chunk)
        part = cache if per_chunk == n else new_cache(model, capacity=columns + max_new)
        # Each chunk shares its prefix only where that pays for the extra forward.
        chunk_prefix = sum(r.prefix_len for r in setup.requests[first:last])
        q = p if chunk_prefix >= max(1, min_shared_prefix) else 0
        if q:
            stats["shared_prefix_tokens"] = stats.get("shared_prefix_tokens", 0) + chunk_prefix
            real_rows = slice(first * width, last * width, width)
            adapter.forward(layout.input_ids[real_rows, :q], mask[real_rows, :q],
                            adapter.slice_positions(positions, real_rows, slice(None, q)), part, logits=False)
            stats["forward_calls"] += 1
            part.batch_repeat_interleave(width)
        chunk_rows = slice(first * width, last * width)
        vision = layout.vision if per_chunk == n else adapter.concat_vision(layout.vision_parts[chunk_rows])
        part_logits.append(adapter.forward(
            layout.input_ids[chunk_rows, q:], mask[chunk_rows, :columns],
            adapter.slice_positions(positions, chunk_rows, slice(q, None)), part, vision=vision))
        stats["forward_calls"] += 1
        parts.append(part)
    if len(parts) > 1:
        cache = merge_rows(model, parts, columns + max_new)
        stats["prefill_chunks"] = len(parts)
    del parts
    logits = torch.cat(part_logits) if len(part_logits) > 1 else part_logits[0]

    recorder = Recorder(len(setup.requests), return_logits)
    sequences = recorder.sequences
    active = list(range(len(setup.requests)))  # requests still generating, in row order
    step = 0
    while True:
        if width == 2:
            real, noised = logits[0::2], logits[1::2]
            out = setup.steer(real, noised, active, return_logits)
            token_ids = out.tokens
            tokens = token_ids.tolist()
            before, after = (m.tolist() for m in out.refusal_mass)
            for k, i in enumerate(active):
                recorder.add(i, tokens[k], real[k], noised[k], out.logits[k] if return_logits else None,
                             mass=(before[k], after[k]))
        else:
            # The logits are ours; ban in place unless they are kept for the caller.
            token_ids = setup.choose(logits, in_place=not return_logits)
            tokens = token_ids.tolist()
            if return_logits:
                for k, i in enumerate(active):
                    recorder.add(i, tokens[k], logits[k])
            else:
                for k, i in enumerate(active):
                    sequences[i].append(tokens[k])
        step += 1

        keep = [k for k, i in enumerate(active) if not setup.done(i, sequences[i])]
        if not keep:
            break
        # Drop finished requests, and the noised rows once the steered steps are over.
        new_width = 1 if (width == 2 and step == setup.steer_steps) else width
        if len(keep) < len(active) or new_width != width:
            if new_width != width:
                stats["cache_bytes_two_branch"] = cache_nbytes(cache)
            # The real row of a request comes first, so range(1) keeps only the real rows.
            # A CPU index works for cache layers on any device (models spread with device_map).
            index = torch.tensor([k * width + b for k in keep for b in range(new_width)])
            cache.batch_select_indices(index)  # copies the kept rows; the old tensors are freed
            adapter.select_rows(index)
            on_mask = index.to(mask.device)
            mask, next_position = mask[on_mask], next_position[on_mask]
            token_ids = token_ids[torch.tensor(keep, device=token_ids.device)]
            if new_width != width:
                stats["cache_bytes_after_drop"] = cache_nbytes(cache)
            active, width = [active[k] for k in keep], new_width

        step_ids = token_ids.to(mask.device)
        if width > 1:
            step_ids = step_ids.repeat_interleave(width)
        columns += 1
        # Steered steps run 2B rows: make one weight read serve them all (see small_batch.py).
        with small_batch_linear(model, enabled=small_batch and width == 2):
            logits = adapter.forward(step_ids[:, None], mask[:, :columns], adapter.step_positions(next_position),
                                     cache)
        stats["forward_calls"] += 1
        next_position = next_position + 1
    return recorder.result(setup.tokenizer, stats)


#: The most prompt tokens (rows x columns) one prefill forward takes on the CPU by default.
#: Prefill is compute-bound there, so splitting the batch costs no arithmetic, while large
#: forwards churn through large temporaries that glibc hands back to the kernel and then
#: page-faults in afresh every time. Measured on the benchmark LLaVA (8 requests, 2 rows each,
#: 613 columns, one thread): 4 requests per forward spent 0.38 s of system time per forward
#: (260k page faults, 15% of the prefill), 2 requests 0.04 s, 1 request none.
CPU_PREFILL_TOKENS = 2048


def _requests_per_chunk(prefill_tokens, requests: int, width: int, columns: int, device) -> int:
    """How many requests one prefill forward takes (at least one)."""
    if prefill_tokens is None:
        prefill_tokens = CPU_PREFILL_TOKENS if torch.device(device).type == "cpu" else 0
    if not prefill_tokens:
        return requests
    return max(1, min(requests, prefill_tokens // max(1, width * columns)))
