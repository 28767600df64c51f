"""RefusalVocabulary: the refusal token set R built from real tokenizers (docs/design.md §1)."""

from __future__ import annotations

import importlib.resources
import random
from types import SimpleNamespace

import pytest
import torch

from safecode_kernels.refusal import (
    DEFAULT_REFUSAL_PHRASES,
    RELEASED_CODE_REFUSAL_PHRASES,
    RefusalVocabulary,
)

# ----- tokenizers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE (GPT-2 / Qwen style), trained here on a few hundred sentences."""
    pytest.importorskip("tokenizers", reason="test dependency tokenizers is not installed")
    pytest.importorskip("transformers", reason="test dependency transformers is not installed")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the image", "this photo", "the man", "a child", "my friend"]
    verbs = ["shows", "contains", "looks like", "is near", "holds", "describes"]
    objects = ["a knife", "a red car", "two apples", "a tall cliff", "some vegetables", "a laptop"]

    def clause():
        return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"

    corpus = [clause().capitalize() + "." for _ in range(200)]
    for phrase in DEFAULT_REFUSAL_PHRASES:  # at the start of an answer and in the middle
        corpus += [f"{phrase}, but {clause()}." for _ in range(3)]
        corpus += [f"{clause().capitalize()}, so {phrase}." for _ in range(3)]

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="module")
def mistral_model_file():
    """Mistral-7B's 32k SentencePiece model, shipped in the `mistral-common` wheel."""
    pytest.importorskip("transformers", reason="test dependency transformers is not installed")
    pytest.importorskip("mistral_common", reason="test dependency mistral-common is not installed")
    pytest.importorskip("sentencepiece", reason="test dependency sentencepiece is not installed")
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip("this mistral-common version does not ship data/tokenizer.model.v1")
    return str(path)


@pytest.fixture(scope="module")
def sp_slow_tokenizer(mistral_model_file):
    """The slow (sentencepiece-backed) Hugging Face tokenizer on that model."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=mistral_model_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sp_fast_tokenizer(mistral_model_file):
    """The fast Llama tokenizer (what transformers 5 builds for Llama/Mistral) on that model."""
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=mistral_model_file)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: sp.get_score(i) for i, piece in enumerate(pieces)}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores))


@pytest.fixture(params=["bpe", "sp_slow", "sp_fast"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture(params=["sp_slow", "sp_fast"])
def sp_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


# ----- helpers ----------------------------------------------------------------------------


def is_blank(tok, token_id: int) -> bool:
    return not tok.decode([token_id]).strip()


def kept(tok, text: str) -> list[int]:
    """The ids of ``text`` that may be refusal tokens: not whitespace-only, not special."""
    special = set(tok.all_special_ids)
    return [i for i in tok.encode(text, add_special_tokens=False) if i not in special and not is_blank(tok, i)]


# ----- from_tokenizer on real tokenizers --------------------------------------------------


def test_ids_are_sorted_unique_int64(tokenizer):
    for mode in ("all", "first"):
        ids = RefusalVocabulary.from_tokenizer(tokenizer, tokens=mode).ids
        assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.numel() > 0
        assert bool((ids[1:] > ids[:-1]).all())


def test_ids_decode_to_pieces_of_the_phrases(tokenizer):
    refusal = RefusalVocabulary.from_tokenizer(tokenizer)
    spellings = [p for phrase in DEFAULT_REFUSAL_PHRASES for p in (phrase, phrase.replace("'", CURLY))]
    for token_id in refusal.ids.tolist():
        piece = tokenizer.decode([token_id]).strip()
        assert any(piece in phrase for phrase in spellings), (token_id, piece)


CURLY = "\u2019"  # the typographic apostrophe


@pytest.fixture(scope="module")
def curly_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer regex, trained on answers that spell
    apostrophes both ways: "I'm" is ``I`` + ``'m`` and "I\u2019m" is ``I`` + ``\u2019m``, as in Qwen."""
    pytest.importorskip("tokenizers", reason="test dependency tokenizers is not installed")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qwen_split = (  # Qwen2's pre-tokenizer regex
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    corpus = ["I'm sorry, but I can't help.", f"I{CURLY}m sorry, but I can{CURLY}t help.", "The cat is red."] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.mark.parametrize("text", ["I'm sorry", "I can't assist"])
def test_both_apostrophes(curly_tokenizer, text):
    """A phrase spelled with either apostrophe gives the tokens of both spellings."""
    tok = curly_tokenizer
    ascii_ids, curly_ids = set(kept(tok, text)), set(kept(tok, text.replace("'", CURLY)))
    assert curly_ids - ascii_ids  # the spellings differ in some token: not vacuous
    for phrase in (text, text.replace("'", CURLY)):
        refusal = RefusalVocabulary.from_tokenizer(tok, [phrase], tokens="all")
        assert ascii_ids | curly_ids <= set(refusal.ids.tolist())
    as_given = RefusalVocabulary.from_tokenizer(tok, [text], tokens="all", apostrophes="as given")
    assert not (curly_ids - ascii_ids) & set(as_given.ids.tolist())
    with pytest.raises(ValueError, match="apostrophes"):
        RefusalVocabulary.from_tokenizer(tok, [text], apostrophes="ascii")


def test_byte_fragments_are_dropped(bpe_tokenizer):
    """Where the curly apostrophe is split into byte tokens, the fragments (shared with every
    other typographic character) stay out of the set; the whole tokens around them stay in."""
    raw = bpe_tokenizer.encode(f"I{CURLY}m sorry", add_special_tokens=False)
    assert any("\ufffd" in bpe_tokenizer.decode([i]) for i in raw)  # not vacuous
    refusal = RefusalVocabulary.from_tokenizer(bpe_tokenizer, [f"I{CURLY}m sorry"], tokens="all")
    assert refusal.ids.tolist() and all("\ufffd" not in bpe_tokenizer.decode([i]) for i in refusal.ids.tolist())
    assert set(kept(bpe_tokenizer, "I'm sorry")) <= set(refusal.ids.tolist())


def test_all_holds_every_token_of_both_variants(tokenizer):
    refusal = RefusalVocabulary.from_tokenizer(tokenizer, tokens="all")
    for phrase in DEFAULT_REFUSAL_PHRASES:
        for text in (phrase, " " + phrase):
            assert set(kept(tokenizer, text)) <= set(refusal.ids.tolist()), text


def test_first_holds_the_first_token_of_both_variants(tokenizer):
    first = RefusalVocabulary.from_tokenizer(tokenizer, tokens="first")
    for phrase in DEFAULT_REFUSAL_PHRASES:
        for text in (phrase, " " + phrase):
            assert kept(tokenizer, text)[0] in first, text


def test_first_is_a_subset_of_all(tokenizer):
    first = RefusalVocabulary.from_tokenizer(tokenizer, tokens="first")
    every = RefusalVocabulary.from_tokenizer(tokenizer, tokens="all")
    assert set(first.ids.tolist()) <= set(every.ids.tolist())
    assert len(first) < len(every)


def test_default_is_first(tokenizer):
    """The tokens refusals start with: "all" holds function words a safe verdict would lower
    in benign answers (measured in benchmarks/refusal_tokens.py, docs/design.md §1.3)."""
    assert torch.equal(
        RefusalVocabulary.from_tokenizer(tokenizer).ids,
        RefusalVocabulary.from_tokenizer(tokenizer, tokens="first").ids,
    )


def test_no_whitespace_or_special_ids(tokenizer):
    # Leading, doubled and trailing whitespace plus special-token text in the phrases.
    phrases = (
        *DEFAULT_REFUSAL_PHRASES,
        "  Sorry",
        "I cannot\n",
        "\tI must",
        "Sorry </s>",
        "Sorry<|endoftext|>",
        "<s>I apologize",
    )
    special = set(tokenizer.all_special_ids)
    for mode in ("all", "first"):
        for token_id in RefusalVocabulary.from_tokenizer(tokenizer, phrases, tokens=mode).ids.tolist():
            assert token_id not in special
            assert not is_blank(tokenizer, token_id), token_id


def test_bpe_space_variants_differ(bpe_tokenizer):
    # Byte-level BPE: "I" opens an answer, "ĠI" continues a sentence; R needs both.
    first = RefusalVocabulary.from_tokenizer(bpe_tokenizer, ["I cannot"], tokens="first")
    pieces = set(bpe_tokenizer.convert_ids_to_tokens(first.ids.tolist()))
    assert pieces == {"I", "ĠI"}


def test_bpe_drops_blank_and_special_tokens(bpe_tokenizer):
    raw = bpe_tokenizer.encode("  Sorry\n<|endoftext|>", add_special_tokens=False)
    assert any(is_blank(bpe_tokenizer, i) for i in raw)  # the test below is not vacuous
    assert bpe_tokenizer.eos_token_id in raw
    refusal = RefusalVocabulary.from_tokenizer(bpe_tokenizer, ["  Sorry\n<|endoftext|>"])
    assert bpe_tokenizer.convert_ids_to_tokens(refusal.ids.tolist()) == ["ĠSorry"]


def test_sentencepiece_lone_space_token_is_dropped(sp_slow_tokenizer):
    tok = sp_slow_tokenizer
    lone = tok.convert_tokens_to_ids("▁")
    assert lone in tok.encode(" I'm sorry", add_special_tokens=False)  # the slow tokenizer emits it
    for mode in ("all", "first"):
        refusal = RefusalVocabulary.from_tokenizer(tok, ["I'm sorry"], tokens=mode)
        assert lone not in refusal
    # "first" skips the lone "▁" and keeps the real first token "▁I".
    first = RefusalVocabulary.from_tokenizer(tok, ["I'm sorry"], tokens="first")
    assert tok.convert_ids_to_tokens(first.ids.tolist()) == ["▁I"]


def test_sentencepiece_first_tokens_are_word_starts(sp_tokenizer):
    first = RefusalVocabulary.from_tokenizer(sp_tokenizer, tokens="first")
    pieces = sp_tokenizer.convert_ids_to_tokens(first.ids.tolist())
    assert all(p.startswith("▁") and p != "▁" for p in pieces), pieces


def test_sentencepiece_slow_and_fast_agree(sp_slow_tokenizer, sp_fast_tokenizer):
    for mode in ("all", "first"):
        slow = RefusalVocabulary.from_tokenizer(sp_slow_tokenizer, tokens=mode)
        fast = RefusalVocabulary.from_tokenizer(sp_fast_tokenizer, tokens=mode)
        assert torch.equal(slow.ids, fast.ids)


def test_released_code_phrases_drop_eos(tokenizer):
    refusal = RefusalVocabulary.from_tokenizer(tokenizer, RELEASED_CODE_REFUSAL_PHRASES)
    assert len(refusal) > 0
    assert tokenizer.eos_token_id not in refusal
    assert kept(tokenizer, "I")[0] in refusal  # the released list's bare "I"


def test_processor_with_tokenizer_is_accepted(tokenizer):
    # Like transformers' ProcessorMixin: has decode, no encode, and a .tokenizer.
    processor = SimpleNamespace(tokenizer=tokenizer, decode=tokenizer.decode)
    assert torch.equal(
        RefusalVocabulary.from_tokenizer(processor).ids,
        RefusalVocabulary.from_tokenizer(tokenizer).ids,
    )


def test_empty_encodings_are_skipped(bpe_tokenizer):
    assert len(RefusalVocabulary.from_tokenizer(bpe_tokenizer, ["", " ", "\n"])) == 0
    assert len(RefusalVocabulary.from_tokenizer(bpe_tokenizer, [])) == 0


def test_bad_tokens_argument(bpe_tokenizer):
    with pytest.raises(ValueError, match="tokens.*'last'"):
        RefusalVocabulary.from_tokenizer(bpe_tokenizer, tokens="last")


@pytest.mark.parametrize("obj", [object(), "gpt2", SimpleNamespace(tokenizer=object())])
def test_object_without_encode_is_rejected(obj):
    with pytest.raises(TypeError, match="tokenizer"):
        RefusalVocabulary.from_tokenizer(obj)


def test_bad_phrases_are_rejected(bpe_tokenizer):
    with pytest.raises(TypeError, match="single string"):
        RefusalVocabulary.from_tokenizer(bpe_tokenizer, "I'm sorry")
    with pytest.raises(TypeError, match="strings"):
        RefusalVocabulary.from_tokenizer(bpe_tokenizer, ["Sorry", 3])


# ----- the id set, mask and cache ---------------------------------------------------------


def test_mask_is_cached_and_correct(bpe_tokenizer):
    refusal = RefusalVocabulary.from_tokenizer(bpe_tokenizer)
    vocab = len(bpe_tokenizer)
    mask = refusal.mask(vocab)
    assert mask is refusal.mask(vocab) and mask is refusal.mask(vocab, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (vocab,)
    assert mask.nonzero().flatten().tolist() == refusal.ids.tolist()
    ids = refusal.ids_on(vocab)
    assert ids is refusal.ids_on(vocab) and torch.equal(ids, refusal.ids)
    # A different vocabulary size is a different entry.
    assert refusal.mask(vocab + 5).shape == (vocab + 5,)


def test_ids_outside_the_vocabulary_raise():
    refusal = RefusalVocabulary([3, 7])
    assert refusal.mask(8).sum() == 2
    for call in (refusal.mask, refusal.ids_on):
        with pytest.raises(ValueError, match=r"refusal id 7 .*\[0, 7\)"):
            call(7)


def test_negative_ids_raise():
    with pytest.raises(ValueError, match=">= 0"):
        RefusalVocabulary([1, -2])


def test_from_ids_len_contains_repr():
    refusal = RefusalVocabulary.from_ids([5, 3, 5, 11])
    assert refusal.ids.tolist() == [3, 5, 11] and len(refusal) == 3
    assert 5 in refusal and torch.tensor(11) in refusal
    assert 4 not in refusal and "5" not in refusal and 5.0 not in refusal
    assert repr(refusal) == "RefusalVocabulary(3 tokens: [3, 5, 11])"
    assert repr(RefusalVocabulary(range(20))).endswith("[0, 1, 2, 3, 4, 5, 6, 7, ...])")
    assert RefusalVocabulary.from_ids(torch.tensor([[4, 2], [2, 9]])).ids.tolist() == [2, 4, 9]
    with pytest.raises(TypeError, match="integer tensor"):
        RefusalVocabulary.from_ids(torch.tensor([1.0, 2.0]))
    empty = RefusalVocabulary.from_ids([])
    assert len(empty) == 0 and not empty.mask(4).any()
