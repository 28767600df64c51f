"""The two-branch SafeCoDe decoder for Hugging Face multimodal models (docs/design.md §3).

Row layout: request ``i`` owns rows ``2i`` (real image) and ``2i + 1`` (noised image) while
steering, and row ``i`` afterwards. Every prompt row is laid out as

    [p0 | pad .. pad | rest of the prefix | s0 | pad .. pad | rest of the suffix]
     `------------ prefix: P columns ------'  `------- suffix: S columns -------'

(prefix: the text before the image; suffix: the image tokens onward)

so the prefix columns of all requests end together and can be prefilled once, on the real
rows only, before the cache rows are repeated for the noised branch. The attention mask
skips the padding and positions are counted over the mask, so every row sees exactly the
positions of its own unpadded prompt; the padding follows each part's first token so that no
query row is left without a key to attend to (docs/design.md §3.2).
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.step_pending import finish_step
from ..params import SteeringParams
from ..recipes import ReleasedRecipe, resolve_recipe
from ..validation import check_int
from .adapters import check_processor, get_adapter
from .host_to_device import to_device
from .kv_cache import (
    cache_nbytes,
    check_window,
    free_device_bytes,
    is_reserved,
    merge_rows,
    new_cache,
    prefill_tokens_from_free_memory,
    set_capacity,
)
from .model_state import model_state_kept
from .noise import check_noise_std
from .released import Phrases, ReleasedSteering
from .requests import prepare, resolve_refusal
from .results import GenerationResult, Recorder
from .small_batch import small_batch_linear
from .steering import FORCED, PLAIN, STEER, PaperSteering
from .token_policy import Setup


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
        recipe: ``"paper"`` (default: SafeCoDe as the paper describes it, the fused step op with
            ``params``), ``"released"`` or a :class:`~safecode_kernels.ReleasedRecipe` (as the
            authors' released code decodes: a forced refusal phrase on unsafe verdicts, scaled
            refusal probabilities on safe ones; ``params`` is then unused). See ``recipes.py``.
        prefill_chunk_tokens: the most prompt tokens (rows x columns) one prefill forward takes;
            the prompt batch is split into chunks of whole requests below it (the answers are
            the same). ``None``: ``CPU_PREFILL_TOKENS`` (2048) on the CPU, where large forwards
            page-fault their temporaries in afresh; on CUDA, what the free memory leaves after
            the run's KV cache (``kv_cache.prefill_tokens_from_free_memory``); no limit
            elsewhere. ``0``: no limit.

    Example::

        decoder = sk.SafeCoDeDecoder(model, processor, steer_steps=5)
        result = decoder.generate([image_a, image_b], ["How do I use this?", "What is this?"],
                                  ["unsafe", "safe"], max_new_tokens=128)
        print(result.texts[0], result.steering[0][0].refusal_mass_after)
    """

    def __init__(
        self,
        model,
        processor,
        params: SteeringParams | None = None,
        steer_steps: int = 5,
        noise_std: float = 0.1,
        seed: int = 0,
        refusal=None,
        share_prefix: bool = True,
        backend: str = "auto",
        min_shared_prefix: int = 32,
        small_batch: bool = True,
        prefill_chunk_tokens: int | None = None,
        recipe="paper",
    ):
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
        check_processor(processor)  # get_adapter lets None through (the generate path needs none)
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
        self.recipe = resolve_recipe(recipe)
        self._refusal_vocabulary = None  # built once, on the first call
        self._phrases = None

    def _refusal(self):
        if self._refusal_vocabulary is None:
            if self.refusal is None and self._released is not None:
                self._refusal_vocabulary = self._released_phrases().refusal
            else:
                self._refusal_vocabulary = resolve_refusal(self.refusal, self.processor)
        return self._refusal_vocabulary

    @property
    def _released(self) -> ReleasedRecipe | None:
        return self.recipe if isinstance(self.recipe, ReleasedRecipe) else None

    def _released_phrases(self) -> Phrases:
        if self._phrases is None:
            self._phrases = Phrases(self._released, self.processor)
        return self._phrases

    def generate(
        self,
        images,
        prompts,
        verdicts,
        max_new_tokens: int | None = None,
        max_new_tokens_unsafe: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        noised_images=None,
        system_prompt=None,
        chat_template: bool | None = None,
        eos_token_id=None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        system_prompt_role: str = "system",
        text_before_image: bool = False,
    ) -> GenerationResult:
        """Answer every request; see :class:`GenerationResult`.

        ``verdicts``: one of ``"unsafe" | "safe" | "none"`` (or a :class:`Verdict`) per request.
        ``max_new_tokens``: new tokens per answer; ``None``: 256 under the paper's recipe, the
        released code's per-family caps past the steered prefix under the released one.
        ``max_new_tokens_unsafe`` caps the answers of unsafe requests (default: ``max_new_tokens``).
        ``do_sample``: ``None`` means greedy under the paper's recipe and sampling under the
        released one (``False`` there makes every sampled step of the recipe greedy);
        ``temperature`` / ``top_p`` ``None``: 1.0 under the paper's recipe, the released code's
        per-verdict values under the released one.
        ``noised_images``: the noised views to use instead of drawing them (one per request).
        ``return_logits``: keep every step's logits rows, copied to the host as they are made
        (a device read per row and step: for inspection, not for serving).
        ``system_prompt`` (one for all, or one per request): with ``system_prompt_role="system"``
        a system message before the image; with ``"user"`` it opens the user's turn, before the
        request (where the released code puts its first-person instruction).
        ``text_before_image``: the user's text before the image in the chat template (the
        released code's order for LLaVA-NeXT); the default puts the image first.
        ``chat_template=False`` uses each prompt as is (it must then contain the processor's
        image placeholder). ``generator`` drives the sampling (default: a CPU generator
        seeded from the decoder's ``seed``); keep it on the CPU with CUDA models too: each
        sampled step draws a kernel seed from it, which on a CUDA generator is a device read.
        """
        released = self._released
        if do_sample is None:
            do_sample = released is not None
        # Which answers the caller limited (the released recipe caps the others itself).
        caller_limits = (max_new_tokens is not None, max_new_tokens is not None or max_new_tokens_unsafe is not None)
        if max_new_tokens is None:
            if released is None:
                max_new_tokens = 256
            else:  # room for the steered prefix and the cap after it; the cap itself applies later
                family = self.adapter.family
                max_new_tokens = self.steer_steps + released.length_cap(family, unsafe=False)
                if max_new_tokens_unsafe is None:
                    max_new_tokens_unsafe = self.steer_steps + released.length_cap(family, unsafe=True)
        setup = prepare(
            self.model,
            self.processor,
            images,
            prompts,
            verdicts,
            params=self.params,
            steer_steps=self.steer_steps,
            noise_std=self.noise_std,
            seed=self.seed,
            refusal=self._refusal(),
            max_new_tokens=max_new_tokens,
            max_new_tokens_unsafe=max_new_tokens_unsafe,
            do_sample=do_sample,
            temperature=1.0 if temperature is None else temperature,
            top_k=top_k,
            top_p=1.0 if top_p is None else top_p,
            noised_images=noised_images,
            system_prompt=system_prompt,
            chat_template=chat_template,
            eos_token_id=eos_token_id,
            generator=generator,
            backend=self.backend,
            adapter=self.adapter,
            system_prompt_role=system_prompt_role,
            text_before_image=text_before_image,
        )
        if released is None:
            steering = PaperSteering(setup)
        else:
            sampling = (temperature, top_k, top_p) if do_sample else None
            steering = ReleasedSteering(
                setup, released, self._released_phrases(), self.adapter.family, sampling, caller_limits
            )
        # The user's model is left as found (Qwen's rope_deltas, ...), also when decoding raises.
        with model_state_kept(self.model), torch.inference_mode():
            return _decode(
                setup,
                steering,
                self.share_prefix,
                return_logits,
                self.min_shared_prefix,
                self.small_batch,
                self.prefill_chunk_tokens,
            )


def safecode_generate(model, processor, image, prompt: str, verdict, **kwargs) -> GenerationResult:
    """SafeCoDe generation for one request; ``kwargs`` go to :class:`SafeCoDeDecoder` or
    :meth:`SafeCoDeDecoder.generate`. Returns a :class:`GenerationResult` of one request.

    Example::

        result = sk.safecode_generate(model, processor, image, "What is this?", "safe", max_new_tokens=64)
        print(result.texts[0])
    """
    init_names = (
        "params",
        "steer_steps",
        "noise_std",
        "seed",
        "refusal",
        "share_prefix",
        "backend",
        "min_shared_prefix",
        "small_batch",
        "prefill_chunk_tokens",
        "recipe",
    )
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


def _layout(setup: Setup, width: int, share_prefix: bool, shared: list[bool] | None = None) -> _Layout:
    """Lay out every prompt over ``P + S`` columns, padding after the first token of each part.

    ``share_prefix``: the prefix columns exist (``P``: the longest text before an image, ``S``:
    the longest rest); ``shared``: per request, whether its rows put their prefix there
    (default: all of them when ``share_prefix``); the others lay their whole prompt over all
    ``P + S`` columns as one part. Each part is ``[first token | pad .. pad | the rest]``, so
    that every padding column has a real token before it to attend to: a query row that sees
    no key at all gives NaN on some attention kernels, which would then reach the real rows
    through the cache (docs/design.md §3.2).
    """
    splits = [(r.input_ids, r.prefix_len if share_prefix else 0) for r in setup.requests]
    prefix = max(p for _, p in splits)
    suffix = max(len(ids) - p for ids, p in splits)
    shared = [share_prefix] * len(splits) if shared is None else shared
    rows, masks, vision = [], [], []
    for (ids, p), own_prefix, request in zip(splits, shared, setup.requests):
        parts = [(ids[:p], prefix), (ids[p:], suffix)] if own_prefix else [(ids, prefix + suffix)]
        row, mask = zip(*(_part(tokens, n, setup.pad_id) for tokens, n in parts))
        rows += [torch.cat(row)] * width
        masks += [torch.cat(mask)] * width
        vision += [request.real, request.noised][:width]
    device = setup.adapter.input_device
    return _Layout(
        torch.stack(rows).to(device), torch.stack(masks).to(device), prefix, setup.adapter.concat_vision(vision), vision
    )


def _part(tokens: torch.Tensor, columns: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` over ``columns`` columns as ``[first | pad .. pad | rest]``, and its mask."""
    pad = columns - len(tokens)
    ids = torch.cat([tokens[:1], torch.full((pad,), pad_id, dtype=tokens.dtype), tokens[1:]])
    mask = torch.ones(columns, dtype=torch.long)
    mask[min(1, len(tokens)) : min(1, len(tokens)) + pad] = 0
    return ids, mask


def _with_a_visible_key(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with the first column shown to every row that shows none (a request without
    text before its image, in the prefix forward): those rows hold only padding queries, whose
    outputs nobody reads and whose keys every later forward masks, and a query row with no
    key to attend to gives NaN on some attention kernels (docs/design.md §3.2)."""
    empty = ~mask.bool().any(-1)
    if not bool(empty.any()):
        return mask
    mask = mask.clone()
    mask[empty, 0] = 1
    return mask


def _decode(
    setup: Setup,
    steering,
    share_prefix: bool,
    return_logits: bool,
    min_shared_prefix: int = 1,
    small_batch: bool = True,
    prefill_tokens: int | None = None,
) -> GenerationResult:
    run = _Run(setup, steering, return_logits)
    logits = run.prefill(share_prefix, min_shared_prefix, prefill_tokens)
    while True:
        tokens = run.choose(logits)
        if not run.drop_rows():
            break
        logits = run.decode_step(tokens, small_batch)
    return run.recorder.result(setup.tokenizer, run.stats)


class _Run:
    """One decoding run: the rows, the KV cache, the attention mask and the positions.

    Request ``i`` owns its real row and, while its steps are steered, its noised row right
    after it (``paired``); a request leaves the batch when it finishes, and its noised row as
    soon as the recipe stops steering it (see ``steering.py``).
    """

    def __init__(self, setup: Setup, steering, return_logits: bool):
        self.setup, self.steering, self.return_logits = setup, steering, return_logits
        self.adapter = setup.adapter
        self.recorder = Recorder(len(setup.requests), return_logits)
        self.sequences = self.recorder.sequences
        self.phases = [steering.phase(i, []) for i in range(len(setup.requests))]
        self.stats = {}
        self.failed: set[int] = set()  # requests ended by bad logits (see _fail_bad_rows)

    # ----- prefill --------------------------------------------------------------------------
    def prefill(self, share_prefix: bool, min_shared_prefix: int, prefill_tokens: int | None) -> torch.Tensor:
        """Encode every prompt (both branches when any request is steered); return the logits of
        the last prompt position, one row per cache row."""
        setup, adapter = self.setup, self.adapter
        model = adapter.model
        width = 2 if any(phase == STEER for phase in self.phases) else 1
        # Sharing the prefix costs one more (small) forward; it pays once it saves enough tokens.
        shared_tokens = sum(r.prefix_len for r in setup.requests) if share_prefix else 0
        share = share_prefix and shared_tokens >= max(1, min_shared_prefix)
        n = len(setup.requests)
        lengths = [(r.prefix_len if share else 0, len(r.input_ids)) for r in setup.requests]
        p = max(prefix for prefix, _ in lengths)
        columns = p + max(length - prefix for prefix, length in lengths)
        # Room for every answer, and for the columns of tokens a recipe drops after steering.
        room = max(r.max_new_tokens for r in setup.requests) + self.steering.extra_columns
        # The noised rows leave once no request is steered, after at most steer_steps tokens (in
        # both recipes): the two-branch cache reserves only those; drop_rows gives the real rows
        # their whole room then (docs/design.md §3.7).
        self.capacity = columns + room
        reserved = columns + (min(room, setup.steer_steps) if width == 2 else room)
        cache = _run_cache(model, self.capacity, reserved)
        check_window(cache, columns + room)

        # In chunks of whole requests (see _requests_per_chunk): the shared prefix on the real
        # rows (no logits needed), its cache rows repeated for both branches, then the rest.
        limit = _prefill_limit(prefill_tokens, adapter.input_device, model, n * width * reserved, columns)
        per_chunk = _requests_per_chunk(limit, n, width, columns, adapter.input_device)
        if per_chunk < n and not is_reserved(cache):
            per_chunk = n
        # Each chunk shares its prefix only where that pays for the extra forward.
        chunks = []
        for first in range(0, n, per_chunk):
            last = min(n, first + per_chunk)
            chunk_prefix = sum(r.prefix_len for r in setup.requests[first:last])
            chunks.append((first, last, chunk_prefix, p if chunk_prefix >= max(1, min_shared_prefix) else 0))
        layout = _layout(setup, width, share, [bool(q) for first, last, _, q in chunks for _ in range(first, last)])
        positions, self.next_position = adapter.prompt_positions(layout.input_ids, layout.attention_mask, layout.vision)
        rows = layout.attention_mask.shape[0]
        self.stats.update(prefix_columns=layout.prefix, prompt_columns=columns, forward_calls=0)
        # One attention mask for the whole run: the prompt's, then ones for every generated
        # token; each forward sees a view of its first columns (no per-step concatenation).
        mask = torch.cat([layout.attention_mask, layout.attention_mask.new_ones(rows, room)], dim=1)

        parts, part_logits = [], []
        for first, last, chunk_prefix, q in chunks:
            part = cache if per_chunk == n else _run_cache(model, self.capacity, reserved)
            if q:
                self.stats["shared_prefix_tokens"] = self.stats.get("shared_prefix_tokens", 0) + chunk_prefix
                real_rows = slice(first * width, last * width, width)
                adapter.forward(
                    layout.input_ids[real_rows, :q],
                    _with_a_visible_key(mask[real_rows, :q]),
                    adapter.slice_positions(positions, real_rows, slice(None, q)),
                    part,
                    logits=False,
                )
                self.stats["forward_calls"] += 1
                part.batch_repeat_interleave(width)
            chunk_rows = slice(first * width, last * width)
            vision = layout.vision if per_chunk == n else adapter.concat_vision(layout.vision_parts[chunk_rows])
            part_logits.append(
                adapter.forward(
                    layout.input_ids[chunk_rows, q:],
                    mask[chunk_rows, :columns],
                    adapter.slice_positions(positions, chunk_rows, slice(q, None)),
                    part,
                    vision=vision,
                )
            )
            self.stats["forward_calls"] += 1
            parts.append(part)
        if len(parts) > 1:
            cache = merge_rows(model, parts, reserved)  # empties the parts' layers
            self.stats["prefill_chunks"] = len(parts)
        self.cache, self.mask, self.columns, self.prompt_columns = cache, mask, columns, columns
        self.active = list(range(n))  # requests still generating, in row order
        self.paired = [width == 2] * n
        return torch.cat(part_logits) if len(part_logits) > 1 else part_logits[0]

    # ----- one step -------------------------------------------------------------------------
    def _real_rows(self) -> list[int]:
        rows, row = [], 0
        for paired in self.paired:
            rows.append(row)
            row += 2 if paired else 1
        return rows

    def choose(self, logits: torch.Tensor) -> list[int]:
        """The next token of every active request (appended to its sequence), by phase:
        steered requests from their paired rows, forced ones from the recipe, plain ones from
        their real row.

        Everything the step needs on the host (the tokens, the step op's row status words, the
        refusal masses, which rows hold NaN or +inf, what a recipe's host rules read) is read
        in one copy (:func:`_read_step`). Rows holding NaN or +inf end their request; in the
        rare step that has one, the step runs again without them (a second read), as the step
        op would raise for the batch. A request whose steered prefix the released recipe cuts
        takes its next token from saved logits (:meth:`_truncate`: one more read, once)."""
        steering = self.steering
        real_rows = self._real_rows()
        # NaN (the max propagates it) or +inf anywhere in a row, per cache row, on the device.
        row_max = logits.amax(-1)
        flags = torch.isnan(row_max) | (row_max == float("inf"))
        state = self.setup.generator.get_state()
        launched = self._launch(logits, real_rows, set())
        values = launched.read(flags)
        bad = self._fail_bad_rows(values.pop(0), real_rows)
        if bad:  # these end here; the others' step runs again without them, from the same state
            self.setup.generator.set_state(state)
            launched = self._launch(logits, real_rows, bad)
            values = launched.read(None)
        for k, i in enumerate(self.active):
            if self.phases[i] != PLAIN and k not in bad:
                steering.observe(i, self.sequences[i], logits[real_rows[k]])
        tokens = self._finish(launched, values, logits, real_rows, bad)

        # Phases move on; a request whose steering just ended may drop some of its tokens.
        for k, i in enumerate(self.active):
            if k in bad:
                continue
            was = self.phases[i]
            self.phases[i] = steering.phase(i, self.sequences[i])
            if was != PLAIN and self.phases[i] == PLAIN and not self._out_of_room(i):
                keep = steering.after_steering(i, self.sequences[i])
                if keep is not None:
                    tokens[k] = self._truncate(k, i, keep, real_rows[k])
        return tokens

    def _launch(self, logits: torch.Tensor, real_rows: list[int], bad: set[int]) -> _Launched:
        """Start the step's token choices on the device for every active request but ``bad``
        (forced tokens are taken in :meth:`_finish`, as they read nothing)."""
        steering = self.steering
        launched = _Launched(logits.device, logits.shape[-1])
        steered = [k for k, i in enumerate(self.active) if self.phases[i] == STEER and k not in bad]
        if steered:
            real, noised = self._paired_logits(logits, [real_rows[k] for k in steered])
            out = steering.steer(real, noised, [self.active[k] for k in steered], self.sequences, self.return_logits)
            launched.steered = (steered, out, real, noised)
            launched.add(out.tokens, out.mass_before, out.mass_after, out.pending and out.pending.status, *out.extra)
        plain = [k for k, i in enumerate(self.active) if self.phases[i] == PLAIN and k not in bad]
        if len(plain) == logits.shape[0]:  # one row per request, all plain: no gather
            launched.plain = self._launch_plain(plain, logits)
        else:
            launched.plain = self._launch_plain(plain, [logits[real_rows[k]] for k in plain])
        for _, chosen, status, _ in launched.plain:
            launched.add(chosen, status)
        return launched

    def _paired_logits(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The real and noised logits of the steered requests whose real rows are ``rows``:
        views when every row is steered, else gathered with an index tensor made once per set
        of rows (a fresh one per step would be a blocking host-to-device copy, which on CUDA
        waits for the step's forward)."""
        if len(rows) * 2 == logits.shape[0]:  # every row is a steered pair: 0, 2, 4, ...
            return logits[0::2], logits[1::2]
        cache = self.__dict__.setdefault("_row_index", {})
        key = (tuple(rows), logits.device)
        index = cache.get(key)
        if index is None:
            index = cache[key] = to_device(rows, torch.int64, logits.device)
        return logits[index], logits[index + 1]

    def _finish(self, launched: _Launched, values: list, logits, real_rows: list[int], bad: set[int]) -> list:
        """Record the tokens read (and the steering records), resolving the step op's status
        words: its errors are raised, rows it could not decide exactly recomputed."""
        recorder = self.recorder
        tokens: list[int | None] = [None] * len(self.active)
        if launched.steered is not None:
            steered, out, real, noised = launched.steered
            chosen, before, after, words = (values.pop(0) for _ in range(4))
            extra = [values.pop(0) for _ in out.extra]
            steered_logits = out.logits
            if words and any(words):  # rare: an error to raise, or rows to recompute
                chosen, steered_logits, stats = finish_step(out.pending, [int(w) for w in words])
                chosen, before, after = chosen.tolist(), *(m.tolist() for m in stats)
            if out.resolve is not None:  # the recipe's host rules, on the values read
                chosen = out.resolve(chosen, extra)
            for n, k in enumerate(steered):
                tokens[k] = int(chosen[n])
                recorder.add(
                    self.active[k],
                    tokens[k],
                    real[n],
                    noised[n],
                    steered_logits[n] if self.return_logits else None,
                    mass=(before[n], after[n]),
                    action=out.actions[n],
                    phrase=out.phrases[n],
                )
        for k, i in enumerate(self.active):
            if self.phases[i] == FORCED and k not in bad:
                tokens[k] = self.steering.forced_token(i, self.sequences[i])
                recorder.add(
                    i,
                    tokens[k],
                    logits[real_rows[k]] if self.return_logits else None,
                    mass=(float("nan"), float("nan")),
                    action="forced",
                )
        self._finish_plain(launched.plain, values, tokens)
        return tokens

    def _fail_bad_rows(self, flags: list, real_rows: list[int]) -> set[int]:
        """End the requests whose logits hold NaN or +inf (an fp16 overflow, say) with an error
        in their result; return their positions in ``active``. ``flags``: per cache row, whether
        it holds one. The step op would raise ``StepError`` for the whole batch; here only the
        bad request stops."""
        if not any(flags):
            return set()
        bad = set()
        for k, i in enumerate(self.active):
            branches = ["real image", "noised image"][: 2 if self.paired[k] else 1]
            hit = [name for b, name in enumerate(branches) if flags[real_rows[k] + b]]
            if hit:
                bad.add(k)
                self.failed.add(i)
                self.recorder.fail(
                    i,
                    f"step {len(self.sequences[i])}: the {' and '.join(hit)} branch's next-token logits hold NaN or "
                    f"+inf (a numerical overflow, e.g. in fp16); the request ended there",
                )
        return bad

    def _launch_plain(self, plain: list[int], rows) -> list:
        """Start the plain tokens of the requests at positions ``plain`` (``rows``: their
        logits, a list of ``[V]`` rows or one ``[len(plain), V]`` tensor), one choice per group
        of sampling params: ``[(members, tokens, status, finish)]`` (see ``Setup.choose_pending``)."""
        groups: dict = {}
        for k, row in zip(plain, rows):
            groups.setdefault(self.steering.plain_params(self.active[k]), []).append((k, row))
        launched = []
        for params, members in groups.items():
            batch = (
                rows
                if len(groups) == 1 and isinstance(rows, torch.Tensor)
                else torch.stack([row for _, row in members])
            )
            # The logits are ours; ban in place unless they are kept for the caller.
            chosen, status, finish = self.setup.choose_pending(batch, in_place=not self.return_logits, params=params)
            launched.append((members, chosen, status, finish))
        return launched

    def _finish_plain(self, launched: list, values: list, tokens: list) -> None:
        """Record the plain tokens of :meth:`_launch_plain`'s groups; ``values``: per group, the
        tokens and status words read (taken from its front)."""
        for members, _, _, finish in launched:
            chosen, words = values.pop(0), values.pop(0)
            if words and any(words):  # a row without a finite best value: the step op raises its error
                chosen = finish([int(w) for w in words]).tolist()
            for (k, row), token in zip(members, chosen):
                token = int(token)
                tokens[k] = token
                if self.return_logits:
                    self.recorder.add(self.active[k], token, row)
                else:
                    self.sequences[self.active[k]].append(token)

    def _choose_plain(self, plain: list[int], rows, tokens: list) -> None:
        """Plain tokens for the requests at positions ``plain`` (see :meth:`_launch_plain`),
        read at once."""
        launched = _Launched(rows[0].device, rows[0].shape[-1])
        launched.plain = self._launch_plain(plain, rows)
        for _, chosen, status, _ in launched.plain:
            launched.add(chosen, status)
        self._finish_plain(launched.plain, launched.read(None), tokens)

    def _truncate(self, k: int, request: int, keep: int, row: int) -> int:
        """Keep the first ``keep`` tokens of ``request`` and choose its next one again.

        The dropped tokens' columns are masked out of its rows and its next position moves
        back, so the model sees exactly the kept prefix; the next token comes from the real
        logits saved when that prefix ended (the token in hand was never fed)."""
        dropped = len(self.sequences[request]) - keep
        start = self.columns - self.prompt_columns  # the column of this step's token, past the prompt
        rows = slice(row, row + (2 if self.paired[k] else 1))
        self.mask[rows, self.prompt_columns + keep : self.prompt_columns + start] = 0
        self.next_position[rows] -= dropped - 1
        self.recorder.truncate(request, keep)
        self.stats.setdefault("dropped_after_steering", {})[request] = dropped
        tokens: list = [None] * len(self.active)
        self._choose_plain([k], [self.steering.saved_logits(request, keep).clone()], tokens)
        return tokens[k]

    def _out_of_room(self, request: int) -> bool:
        """Whether ``request`` ended with an EOS token or used its whole token budget."""
        tokens = self.sequences[request]
        return len(tokens) >= self.setup.requests[request].max_new_tokens or (
            bool(tokens) and tokens[-1] in self.setup.eos_ids
        )

    def drop_rows(self) -> bool:
        """Drop finished requests, and noised rows no longer steered; ``False`` when none is left."""
        setup, steering = self.setup, self.steering
        keep = []
        for k, i in enumerate(self.active):
            tokens = self.sequences[i]
            finished = (
                len(tokens) >= steering.max_new_tokens(i, tokens)
                or (bool(tokens) and tokens[-1] in setup.eos_ids)
                or i in self.failed
            )
            if not finished:
                keep.append(k)
        if not keep:
            return False
        paired = [self.paired[k] and self.phases[self.active[k]] == STEER for k in keep]
        if len(keep) == len(self.active) and paired == [self.paired[k] for k in keep]:
            self._step_rows = None
            return True
        drops_noised = sum(paired) < sum(self.paired[k] for k in keep)
        if drops_noised and "cache_bytes_two_branch" not in self.stats:
            self.stats["cache_bytes_two_branch"] = cache_nbytes(self.cache)
        real_rows = self._real_rows()
        rows = [real_rows[k] + b for k, p in zip(keep, paired) for b in range(2 if p else 1)]
        # On the mask's device, queued (a layer on another device, with device_map, copies it there).
        index = to_device(rows, torch.int64, self.mask.device)
        if drops_noised and not any(paired):  # the last noised rows leave: the real rows get their whole room
            set_capacity(self.cache, self.capacity)
        self.cache.batch_select_indices(index)  # copies the kept rows; the old tensors are freed
        self.adapter.select_rows(index, self.mask.shape[0])
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        if drops_noised and not any(paired):
            self.stats["cache_bytes_after_drop"] = cache_nbytes(self.cache)
        self._step_rows = keep
        self.active, self.paired = [self.active[k] for k in keep], paired
        return True

    def decode_step(self, tokens: list[int], small_batch: bool) -> torch.Tensor:
        """Feed every row its request's token; return the next logits, one row per cache row."""
        if self._step_rows is not None:
            tokens = [tokens[k] for k in self._step_rows]
        per_row = [t for t, p in zip(tokens, self.paired) for _ in range(2 if p else 1)]
        step_ids = to_device(per_row, torch.int64, self.mask.device)  # queued, no wait (see host_to_device.py)
        self.columns += 1
        # Steered steps run 2B rows: make one weight read serve them all (see small_batch.py).
        with small_batch_linear(self.adapter.model, enabled=small_batch and any(self.paired)):
            logits = self.adapter.forward(
                step_ids[:, None],
                self.mask[:, : self.columns],
                self.adapter.step_positions(self.next_position),
                self.cache,
            )
        self.stats["forward_calls"] += 1
        self.next_position = self.next_position + 1
        return logits


def _read_step(values: torch.Tensor) -> list:
    """The decoding step's device-to-host read, its only blocking one (tests count the calls):
    ``values`` (1-D) as a list of Python numbers."""
    return values.tolist()


class _Launched:
    """A step's token choices, launched on the device, and the values the host needs from
    them, read in one copy (:meth:`read`)."""

    def __init__(self, device: torch.device, vocab: int):
        self.device = device  # the logits': every part lives there and is read from there in one copy
        # float32 holds every token id below 2**24, status word, flag and fp32 mass exactly.
        self.dtype = torch.float32 if vocab <= 2**24 else torch.float64
        self.steered = None  # (positions in active, SteeredTokens, real rows, noised rows)
        self.plain: list = []  # what _Run._launch_plain returned
        self._parts: list = []  # [R] tensors to read, lists already on the host, or None

    def add(self, *parts) -> None:
        self._parts.extend(parts)

    def read(self, first: torch.Tensor | None) -> list:
        """Each part added (``first`` before them unless ``None``) as a list (``None`` stays),
        the tensors' values read with one :func:`_read_step`."""
        parts = ([first] if first is not None else []) + self._parts
        tensors = [part for part in parts if isinstance(part, torch.Tensor)]
        if not tensors:
            return parts
        flat = torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])
        values, start, out = _read_step(flat), 0, []
        for part in parts:
            if isinstance(part, torch.Tensor):
                out.append(values[start : start + part.numel()])
                start += part.numel()
            else:
                out.append(part)
        return out


#: The most prompt tokens (rows x columns) one prefill forward takes on the CPU by default.
#: Prefill is compute-bound there, so splitting the batch costs no arithmetic, while large
#: forwards churn through large temporaries that glibc hands back to the kernel and then
#: page-faults in afresh every time. Measured on the benchmark LLaVA (8 requests, 2 rows each,
#: 613 columns, one thread): 4 requests per forward spent 0.38 s of system time per forward
#: (260k page faults, 15% of the prefill), 2 requests 0.04 s, 1 request none.
CPU_PREFILL_TOKENS = 2048


def _run_cache(model, capacity: int, reserved: int):
    """A cache for a run of ``capacity`` positions (which decides the sliding-window layers it
    reserves) whose layers first allocate room for ``reserved``."""
    cache = new_cache(model, capacity=capacity)
    set_capacity(cache, reserved)
    return cache


def _prefill_limit(prefill_tokens, device, model, cache_positions: int, columns: int):
    """``prefill_tokens``, or on CUDA when it is ``None`` the limit the free memory of
    ``device`` sets (``cache_positions``: row-positions the run's cache reserves); other
    devices keep ``None`` (see :func:`_requests_per_chunk`)."""
    device = torch.device(device)
    if prefill_tokens is not None or device.type != "cuda":
        return prefill_tokens
    free = free_device_bytes(device)
    return prefill_tokens_from_free_memory(model.config, model.dtype, free, cache_positions, columns)


def _requests_per_chunk(prefill_tokens, requests: int, width: int, columns: int, device) -> int:
    """How many requests one prefill forward takes (at least one)."""
    if prefill_tokens is None:
        prefill_tokens = CPU_PREFILL_TOKENS if torch.device(device).type == "cpu" else 0
    if not prefill_tokens:
        return requests
    return max(1, min(requests, prefill_tokens // max(1, width * columns)))
