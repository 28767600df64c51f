"""The resumable score loop: judge every generation of a run, then write its report.

Files in a run folder ``DIR``:

- ``generations.jsonl`` (read): one generation per line (``id``, ``benchmark``, ``prompt``,
  ``image``, ``method``, ``response``, optional ``error``, the benchmark's fields...), read by
  :func:`safecode_kernels.evaluation.store.read_lines`'s rules: a cut-short *last* line (a run
  cut short by a crash: no trailing newline, or not a JSON object) is ignored with a warning; a
  bad line anywhere else is an error naming its number. A later line with the same ``id``
  supersedes an earlier one (a retried generation). Lines with ``error`` set (or no text
  ``response``) are not scored; the report counts them as ``errors``.
- ``scores.jsonl`` (appended): one line per judged generation, ``{"id", "label", "answer",
  "scorer"}``; ``answer`` is the judge's raw answer (for ``refusal-strings``, the matched phrase or
  ``null``), ``label`` is ``null`` when the answer named no label. Ids already there are skipped,
  so an interrupted ``score`` resumes where it stopped (delete lines to have them judged again).
  Each judgement is appended (:func:`safecode_kernels.evaluation.store.append`: a whole line,
  fsynced) as it finishes: a crash loses at most the requests in flight; a cut-short last line is
  dropped and redone.
- ``report.json``, ``report.md``, ``report.png``: see :mod:`.report`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import sys
import warnings
from pathlib import Path

from safecode_kernels.judges import image_data_url

from .. import store
from ..run_config import read_config
from .metrics import compute_metrics, label_counts
from .refusal_strings import refusal_label
from .report import generation_summary, write_report
from .rubrics import canonical_benchmark, load_template, question_of, rubric_for

GENERATIONS, SCORES = "generations.jsonl", "scores.jsonl"
SCORERS = ("llm", "refusal-strings")
#: Images sent to the judge are scaled down to this many pixels on their long side.
MAX_IMAGE_SIDE = 1024


# ----- the files -----------------------------------------------------------------------------
def load_generations(directory) -> tuple[str, list[dict]]:
    """``(benchmark, generations)`` of ``DIR/generations.jsonl`` (one per id, a later line winning).

    Raises ``FileNotFoundError`` naming the file when it is missing; ``ValueError`` when it holds
    no generation, mixes benchmarks, names an unknown benchmark, or has a line without ``id``."""
    path = Path(directory) / GENERATIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate the run first (safecode-kernels eval)")
    entries, cut = store.read_numbered(path)
    if cut is not None:
        warnings.warn(f"{path}: ignoring the cut-short last line {cut}", stacklevel=2)
    benchmark, first, by_id = None, None, {}
    for number, record in entries:
        where = f"{path}, line {number}"
        if "id" not in record:
            raise ValueError(f"{where}: no 'id'")
        try:
            hash(record["id"])
        except TypeError:
            raise ValueError(f"{where}: the id must be a string or a number, got {record['id']!r}") from None
        if not record.get("benchmark"):
            raise ValueError(f"{where}: no 'benchmark'")
        try:
            name = canonical_benchmark(record["benchmark"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if benchmark is None:
            benchmark, first = name, number
        elif name != benchmark:
            raise ValueError(
                f"{path} mixes benchmarks ({benchmark!r} on line {first}, {name!r} on line {number}): "
                "score each benchmark's run in its own folder"
            )
        by_id[record["id"]] = record
    if benchmark is None:
        raise ValueError(f"{path} holds no generation")
    return benchmark, list(by_id.values())


def failed(generation: dict) -> bool:
    """Whether a generation is not scored: its ``error`` is set or it has no text ``response``."""
    return generation.get("error") not in (None, "") or not isinstance(generation.get("response"), str)


def read_scores(directory, scorer: str | None = None) -> dict:
    """``id -> score record`` of ``DIR/scores.jsonl`` (empty when absent; a later line wins).

    Raises ``ValueError`` for a bad line (not the last), a line without ``id``/``label``, or a
    line written by another scorer than ``scorer`` (labels of two scorers must not mix)."""
    path = Path(directory) / SCORES
    if not path.is_file():
        return {}
    scores = {}
    for number, record in store.read_numbered(path)[0]:
        if "id" not in record or "label" not in record:
            raise ValueError(f"{path}, line {number}: a score needs 'id' and 'label'")
        if scorer is not None and record.get("scorer", scorer) != scorer:
            raise ValueError(
                f"{path} was written by scorer {record['scorer']!r}, not {scorer!r}: "
                f"move it away to score this run again with {scorer!r}"
            )
        scores[record["id"]] = record
    return scores


# ----- judging -------------------------------------------------------------------------------
def _image_path(reference: str, directory: Path) -> Path | None:
    for candidate in (Path(reference), directory / reference):
        if candidate.is_file():
            return candidate
    return None


class _LlmJudging:
    """Builds the judge's messages for a sample, asks the judge, parses the label."""

    def __init__(self, judge, benchmark: str, template: str | None, image_loader, directory: Path):
        self.judge, self.benchmark, self.template = judge, benchmark, template
        self.image_loader, self.directory = image_loader, directory

    def check_images(self, samples: list[dict]) -> None:
        """Fail before any request when the default loader cannot open an image the judge must see."""
        if self.image_loader is not None:
            return
        for sample in samples:
            reference = sample.get("image")
            if (
                reference
                and rubric_for(self.benchmark, sample).uses_image
                and _image_path(str(reference), self.directory) is None
            ):
                raise FileNotFoundError(
                    f"sample {sample['id']!r}: image {reference!r} is not a file (here or in {self.directory}); "
                    "pass image_loader= to score(...) for images that are not local files (hf://...)"
                )

    def _image_url(self, reference) -> str:
        if self.image_loader is not None:
            return image_data_url(self.image_loader(reference), MAX_IMAGE_SIDE)
        from PIL import Image

        with Image.open(_image_path(str(reference), self.directory)) as image:
            return image_data_url(image, MAX_IMAGE_SIDE)

    def __call__(self, sample: dict) -> dict:
        rubric = rubric_for(self.benchmark, sample, self.template)
        reference = sample.get("image")
        image_url = self._image_url(reference) if rubric.uses_image and reference else None
        answer = self.judge.complete(rubric.messages(question_of(sample), sample["response"], image_url))
        if not isinstance(answer, str):
            raise TypeError(f"the judge's complete() must return a str, got {type(answer).__name__}")
        return {"id": sample["id"], "label": rubric.parse(answer), "answer": answer, "scorer": "llm"}


def _judge_all(work, pending: list[dict], out: Path, done: dict, concurrency: int, bar) -> None:
    """Run ``work`` on ``pending`` with at most ``concurrency`` in flight; append each record to
    ``out`` as it finishes (from this thread only). The first error stops the loop and is raised."""
    samples = iter(pending)
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="safecode-score")
    inflight = {pool.submit(work, s): s for s in itertools.islice(samples, concurrency)}
    try:
        while inflight:
            finished, _ = concurrent.futures.wait(inflight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                sample = inflight.pop(future)
                try:
                    record = future.result()
                except Exception as exc:
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"while judging sample {sample['id']!r} (finished ones are in {out})")
                    raise
                store.append(out, [record])
                done[record["id"]] = record
                bar.update(1)
                for nxt in itertools.islice(samples, 1):
                    inflight[pool.submit(work, nxt)] = nxt
    finally:
        # On an error, drop the queue and do not wait for the requests in flight.
        pool.shutdown(wait=not inflight, cancel_futures=True)


def _judge_name(judge) -> str | None:
    model = getattr(judge, "model", None)
    return None if model is None else str(model)


def score(
    directory,
    judge=None,
    scorer: str = "llm",
    judge_template=None,
    concurrency: int = 8,
    progress: bool = True,
    image_loader=None,
) -> dict:
    """Judge every generation of the run in ``directory``, then write its report.

    Args:
        directory: the run folder holding ``generations.jsonl``.
        judge: for ``scorer="llm"``, any object with ``complete(messages) -> str`` (a
            :class:`~.chat.ChatClient`, or a fake in tests); called from up to ``concurrency``
            threads at once. Unused by ``"refusal-strings"``.
        scorer: ``"llm"`` (the benchmark's judge rubric, see :mod:`.rubrics`) or
            ``"refusal-strings"`` (no judge: refusal phrases, see :mod:`.refusal_strings`; gives
            refusal rates only).
        judge_template: path of a custom judge prompt with ``{question}`` and ``{response}``
            (see :func:`~.rubrics.load_template`), replacing the benchmark's built-in prompt.
        concurrency: judge requests in flight at once.
        progress: show a tqdm bar on stderr (samples/s, ETA) when stderr is a terminal.
        image_loader: ``reference -> PIL image`` for the ``image`` field of samples whose judge
            sees the image (MOSSBench); default: the reference as a local path, tried as given and
            relative to ``directory`` (``hf://`` references need a loader).

    Returns the report (the content of ``report.json``, see :mod:`.report`).

    Writes ``DIR/scores.jsonl`` (appended, resumable), ``DIR/report.json``, ``DIR/report.md`` and
    ``DIR/report.png`` (skipped with a warning without matplotlib).

    Raises:
        FileNotFoundError: no ``generations.jsonl``, a missing template, or an image the judge
            must see that is not a local file (before any request is sent).
        ValueError: bad arguments, an unparseable line of a JSONL file (other than the last),
            mixed or unknown benchmarks, a template with an unknown placeholder, or a
            ``scores.jsonl`` written by the other scorer.
        TypeError: a judge without ``complete``.
        JudgeError: the judge failed (its subclasses from :mod:`safecode_kernels.judges`); the
            judgements finished before are kept in ``scores.jsonl``.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(map(repr, SCORERS))}, got {scorer!r}")
    if scorer == "llm":
        if judge is None:
            raise ValueError(
                "scorer='llm' needs a judge (e.g. ChatClient(base_url, model)); scorer='refusal-strings' needs none"
            )
        if not callable(getattr(judge, "complete", None)):
            raise TypeError(f"the judge must have a complete(messages) -> str method, got {type(judge).__name__}")
    elif judge_template is not None:
        raise ValueError("judge_template is a judge prompt: it needs scorer='llm'")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    template = load_template(judge_template) if judge_template is not None else None
    run_config = read_config(directory)  # for the report; a broken run.json fails before any request

    benchmark, generations = load_generations(directory)
    scoreable = [g for g in generations if not failed(g)]
    done = read_scores(directory, scorer)
    pending = [g for g in scoreable if g["id"] not in done]
    if scorer == "llm":
        work = _LlmJudging(judge, benchmark, template, image_loader, directory)
        work.check_images(pending)
    if pending:
        bar = tqdm(
            total=len(pending),
            desc=f"scoring {benchmark}",
            unit="sample",
            file=sys.stderr,
            disable=None if progress else True,  # None: tqdm shows the bar on a terminal only
            dynamic_ncols=True,
        )
        try:
            if scorer == "llm":
                _judge_all(work, pending, directory / SCORES, done, concurrency, bar)
            else:
                records = []
                for sample in pending:  # instant and repeatable: one append (one fsync) at the end
                    label, phrase = refusal_label(sample["response"])
                    records.append({"id": sample["id"], "label": label, "answer": phrase, "scorer": scorer})
                    bar.update(1)
                store.append(directory / SCORES, records)
                done.update((record["id"], record) for record in records)
        finally:
            bar.close()

    scored = [g for g in scoreable if g["id"] in done]
    labels = {g["id"]: done[g["id"]]["label"] for g in scored}
    report = {
        "benchmark": benchmark,
        "run": directory.resolve().name,
        "methods": sorted({str(g["method"]) for g in generations if g.get("method") is not None}),
        "scorer": scorer,
        "judge": _judge_name(judge) if scorer == "llm" else None,
        "judge_template": None if judge_template is None else str(judge_template),
        "generations": len(generations),
        "n": len(scored),
        "unparsed": [g["id"] for g in scored if labels[g["id"]] is None],
        "errors": len(generations) - len(scoreable),
        "label_counts": label_counts(labels.values()),
        "metrics": compute_metrics(benchmark, scored, labels, scorer),
        "generation": generation_summary(run_config),
    }
    write_report(directory, report)
    return report


__all__ = ["GENERATIONS", "SCORERS", "SCORES", "failed", "load_generations", "read_scores", "score"]
