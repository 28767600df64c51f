"""Tiny, randomly initialised models and processors of every supported family, built offline
from their configs: the fixtures of the demo, the tests and the benchmarks (no weights are
downloaded). :mod:`.tiny` holds the tokenizer trainer and the one LLaVA-1.5 builder
(:func:`~.tiny.build_llava`, with the demo's, the tests' and the benchmark's specs);
:mod:`.tiny_models` the test families (:data:`~.tiny_models.BUILDERS`)."""
