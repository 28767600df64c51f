"""Benchmark loaders: one module per benchmark, each turning a local copy of the published data into
a list of :class:`~safecode_kernels.evaluation.samples.Sample`.

>>> from safecode_kernels.evaluation.loaders import BENCHMARKS, load_benchmark
>>> samples = load_benchmark("mossbench", "data/MOSSBench/data", limit=10)   # doctest: +SKIP

Each module's docstring gives its layout, source repository, sample ids, ``fields``, order and splits:

===================  ==========================  =================================================
name                 module                      ``root``
===================  ==========================  =================================================
``mossbench``        :mod:`.mossbench`           MOSSBench ``data`` folder
``mm-safetybench``   :mod:`.mm_safetybench`      MM-SafetyBench ``data`` folder (questions + imgs)
``mssbench``         :mod:`.mssbench`            MSSBench folder (``combined.json``, chat, embodied)
``figstep``          :mod:`.figstep`             FigStep ``data`` folder
``hades``            :mod:`.hades`               local copy of ``Monosail/HADES``, or that name
``msts``             :mod:`.msts`                local copy of ``felfri/MSTS``, or that name
``jsonl``            :mod:`.jsonl`               a JSON Lines file of your own samples
===================  ==========================  =================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable

from safecode_kernels.evaluation.loaders import figstep, hades, jsonl, mm_safetybench, mossbench, mssbench, msts
from safecode_kernels.evaluation.samples import Sample, first

_LOADERS: dict[str, Callable[..., list[Sample]]] = {
    "mossbench": mossbench.load,
    "mm-safetybench": mm_safetybench.load,
    "mssbench": mssbench.load,
    "figstep": figstep.load,
    "hades": hades.load,
    "msts": msts.load,
    "jsonl": jsonl.load,
}

#: The benchmark names :func:`load_benchmark` knows, as recorded in ``Sample.benchmark``.
BENCHMARKS: tuple[str, ...] = tuple(_LOADERS)


def load_benchmark(
    name: str, root: str | os.PathLike[str] | None, *, split: str | None = None, limit: int | None = None
) -> list[Sample]:
    """The samples of benchmark ``name`` read from ``root``, in the benchmark's documented order.

    ``split`` picks a part where the benchmark has them (MM-SafetyBench image kind, MSSBench setting,
    FigStep ``SafeBench-Tiny``, HADES split, MSTS language); ``None`` is the whole benchmark or its
    default split. ``limit`` keeps the first ``limit`` samples of that order. ``root`` may be ``None``
    only for ``hades`` and ``msts`` (the hub data set from the local cache).

    Raises ``ValueError`` for an unknown name (listing :data:`BENCHMARKS`), split or limit,
    :class:`~safecode_kernels.evaluation.samples.DataError` (a ``ValueError``) for data that does not
    match the layout, and ``ImportError`` when ``hades`` or ``msts`` need the missing ``datasets``.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    first([], limit)  # a bad limit fails before any file is read
    return loader(root, split=split, limit=limit)
