"""Tiny, randomly initialised models and processors of every supported family, built offline
from their configs: the fixtures of the demo, the tests and the benchmarks (no weights are
downloaded). :mod:`.tiny` holds the demo's LLaVA and the tokenizer trainer; :mod:`.tiny_models`
the test families (:data:`~.tiny_models.BUILDERS`)."""
