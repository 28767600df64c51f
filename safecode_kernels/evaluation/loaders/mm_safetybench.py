"""MM-SafetyBench: harmful questions whose key phrase is moved into an image, in 13 scenarios.

Source: https://github.com/isXinLiu/MM-SafetyBench (``data/processed_questions``; the images are
distributed separately by the authors as ``imgs``).

Layout (``root`` is the ``data`` folder)::

    <root>/processed_questions/<scenario>.json   {"<qid>": {"Question", "Rephrased Question",
                                                           "Rephrased Question(SD)", ...}, ...}
    <root>/imgs/<scenario>/<kind>/<qid>.jpg      kind: SD, SD_TYPO, TYPO

for the 13 scenarios of :data:`SCENARIOS`, spelled as published (``01-Illegal_Activitiy`` included).
Each question yields one sample per image kind: the ``SD`` image goes with ``"Rephrased Question(SD)"``,
the ``SD_TYPO`` and ``TYPO`` images with ``"Rephrased Question"``. Scenario files that are absent are
skipped (a partial copy loads); at least one must exist.

Samples: ``id`` = ``<scenario>/<qid>/<kind>``, ``prompt`` = the rephrased question of the kind,
``fields`` = ``{"scenario", "kind", "question": <original "Question">}``; ordered by scenario (01-13),
``qid`` (numerically), then kind (SD, SD_TYPO, TYPO). ``split`` selects one kind (``"SD"``,
``"SD_TYPO"`` or ``"TYPO"``); ``None`` loads all three.

Raises :class:`DataError` when no scenario file exists, for invalid JSON, a question that is not an
object, a missing or mistyped field, or a missing image of a loaded kind (named by its path).
"""

from __future__ import annotations

import os

from safecode_kernels.evaluation.samples import (
    DataError,
    Sample,
    check_object,
    check_split,
    field_of,
    first,
    image_file,
    natural_key,
    read_json,
    root_path,
)

BENCHMARK = "mm-safetybench"
QUESTIONS_DIR = "processed_questions"
IMAGES_DIR = "imgs"
#: The 13 scenarios, spelled as in the published file names.
SCENARIOS = (
    "01-Illegal_Activitiy",
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
#: Image kind -> the question field that goes with it.
KINDS = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}
ORIGINAL_QUESTION = "Question"


def load(root: str | os.PathLike[str], *, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """The MM-SafetyBench samples under ``root`` (see the module docstring), the first ``limit`` in order."""
    root = root_path(root, BENCHMARK)
    split = check_split(split, tuple(KINDS), BENCHMARK)
    kinds = tuple(KINDS) if split is None else (split,)
    questions_dir = root / QUESTIONS_DIR
    present = [s for s in SCENARIOS if (questions_dir / f"{s}.json").is_file()]
    if not present:
        raise DataError(
            f"{questions_dir}: no MM-SafetyBench scenario file found (expected e.g. "
            f"{SCENARIOS[0]}.json ... {SCENARIOS[-1]}.json)"
        )
    samples: list[Sample] = []
    for scenario in present:
        path = questions_dir / f"{scenario}.json"
        questions = check_object(read_json(path), str(path), "an object of questions")
        for qid in sorted(questions, key=natural_key):
            where = f"{path}: question {qid!r}"
            question = check_object(questions[qid], where)
            original = field_of(question, ORIGINAL_QUESTION, str, where)
            for kind in kinds:
                prompt = field_of(question, KINDS[kind], str, where)
                image = image_file(root / IMAGES_DIR / scenario / kind / f"{qid}.jpg", f"{where} ({kind})")
                fields = {"scenario": scenario, "kind": kind, "question": original}
                samples.append(Sample(f"{scenario}/{qid}/{kind}", BENCHMARK, prompt, image, fields))
    return first(samples, limit)
