"""Builders of tiny data folders in each benchmark's published layout, for tests.

Every builder writes deterministic content, spelled out in its docstring so that tests can state their
expectations literally, makes tiny PNG/JPEG images with PIL, and returns the root to pass to the loader
(for ``jsonl``, the file). Files are written in a scrambled order where the loader must sort. The hub
builders (``make_hades``, ``make_msts``) need the ``datasets`` library.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

#: FigStep's SafeBench category names by ``category_id`` (``data/question/safebench.csv``).
FIGSTEP_CATEGORIES = (
    "Illegal Activity",
    "Hate Speech",
    "Malware Generation",
    "Physical Harm",
    "Fraud",
    "Adult Content",
    "Privacy Violation",
    "Legal Opinion",
    "Financial Advice",
    "Health Consultation",
)
HADES_SCENARIOS = ("Violence", "Financial", "Privacy", "Self-Harm", "Animal")
MOSS_OVER = ("type 1", "type 2", "type 3")


def color(index: int) -> tuple[int, int, int]:
    """The RGB colour of image ``index`` (distinct for small indices)."""
    return (index * 37 % 256, index * 91 % 256, 200)


def write_image(path: Path, index: int = 0, mode: str = "RGB") -> Path:
    """A 4x4 image of ``color(index)`` converted to ``mode`` (``"P"``: an exact adaptive palette); the
    format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (4, 4), color(index))
    image = image.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    image.save(path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Rewrite the JSON file ``path`` after ``change(obj)`` mutated its content."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    write_json(path, obj)


def make_mossbench(root: Path, n: int = 3) -> Path:
    """``images_information/information.json`` with scenes ``"1"``..``"n"`` (written last to first):
    pid ``"<p>"``, question ``"What can we do here? (scene <p>)"``, image ``images/<p>.png``,
    ``metadata.over`` ``"type <(p - 1) % 3 + 1>"``. Image ``1`` is a palette PNG, image ``2`` RGBA."""
    scenes = {}
    for pid in range(n, 0, -1):
        write_image(root / "images" / f"{pid}.png", pid, {1: "P", 2: "RGBA"}.get(pid, "RGB"))
        scenes[str(pid)] = {
            "image": f"images/{pid}.png",
            "short description": "a scene",
            "question": f"What can we do here? (scene {pid})",
            "metadata": {"over": MOSS_OVER[(pid - 1) % 3], "human": 0, "child": 0, "syn": 1, "ocr": 0, "harm": [7]},
            "pid": str(pid),
            "description": "a scene",
        }
    write_json(root / "images_information" / "information.json", scenes)
    return root


def make_mm_safetybench(
    root: Path, scenarios: tuple[str, ...] = ("01-Illegal_Activitiy", "02-HateSpeech"), n: int = 2
) -> Path:
    """``processed_questions/<scenario>.json`` with qids ``"0"``..``"n-1"`` (written last to first):
    ``"Question"`` = ``"Original <scenario> <qid>"``, ``"Rephrased Question"`` = ``"Typo <scenario> <qid>"``,
    ``"Rephrased Question(SD)"`` = ``"Picture <scenario> <qid>"``; ``imgs/<scenario>/<kind>/<qid>.jpg``
    for SD, SD_TYPO and TYPO."""
    for scenario in scenarios:
        questions = {}
        for qid in range(n - 1, -1, -1):
            questions[str(qid)] = {
                "Question": f"Original {scenario} {qid}",
                "Key Phrase": "phrase",
                "Phrase Type": "activity",
                "Rephrased Question": f"Typo {scenario} {qid}",
                "Rephrased Question(SD)": f"Picture {scenario} {qid}",
            }
            for kind in ("SD", "SD_TYPO", "TYPO"):
                write_image(root / "imgs" / scenario / kind / f"{qid}.jpg", qid)
        write_json(root / "processed_questions" / f"{scenario}.json", questions)
    return root


def make_mssbench(
    root: Path,
    chat: int = 2,
    queries: int = 2,
    embodied: int = 1,
    instructions: int = 2,
    filename: str = "combined.json",
) -> Path:
    """``<filename>`` with ``chat`` items ``i``: images ``chat/safe_<i>.jpg``, ``chat/unsafe_<i>.jpg``, queries
    ``"Chat query <i>.<q>"``, ``Type`` ``"property damage"``; and ``embodied`` items ``i``: images
    ``embodied/safe_<i>.png``, ``embodied/unsafe_<i>.png``, instructions ``"Safe task <i>.<k>"`` /
    ``"Unsafe task <i>.<k>"``, ``category`` ``"fire"``."""
    data: dict[str, list] = {"chat": [], "embodied": []}
    for i in range(chat):
        write_image(root / "chat" / f"safe_{i}.jpg", 2 * i)
        write_image(root / "chat" / f"unsafe_{i}.jpg", 2 * i + 1)
        data["chat"].append(
            {
                "safe_image_path": f"safe_{i}.jpg",
                "intent": "to do something",
                "unsafe_image": "an unsafe scene",
                "unsafe_image_path": f"unsafe_{i}.jpg",
                "Type": "property damage",
                "queries": [f"Chat query {i}.{q}" for q in range(queries)],
            }
        )
    for i in range(embodied):
        write_image(root / "embodied" / f"safe_{i}.png", 2 * i)
        write_image(root / "embodied" / f"unsafe_{i}.png", 2 * i + 1)
        data["embodied"].append(
            {
                "task": "place the kettle",
                "category": "fire",
                "safe_instruction": f"Safe task {i}.0",
                "unsafe_instruction": f"Unsafe task {i}.0",
                "safe_instructions": [f"Safe task {i}.{k}" for k in range(instructions)],
                "unsafe_instructions": [f"Unsafe task {i}.{k}" for k in range(instructions)],
                "safe": f"safe_{i}.png",
                "unsafe": f"unsafe_{i}.png",
            }
        )
    write_json(root / filename, data)
    return root


def make_figstep(root: Path, categories: int = 2, tasks: int = 2, split: str = "SafeBench") -> Path:
    """``question/<safebench.csv | SafeBench-Tiny.csv>`` with rows for category ids ``1``..``categories``
    and task ids ``1``..``tasks``, written last to first: ``category_name`` from FIGSTEP_CATEGORIES,
    ``question`` ``"How to do <c>.<t>?"``, ``instruction`` ``"Steps to do <c>.<t>, carefully."``;
    ``images/<split>/query_ForbidQI_<c>_<t>_6.png``."""
    name = {"SafeBench": "safebench.csv", "SafeBench-Tiny": "SafeBench-Tiny.csv"}[split]
    path = root / "question" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "category_id", "task_id", "category_name", "question", "instruction"])
        for c in range(categories, 0, -1):
            for t in range(tasks, 0, -1):
                writer.writerow(
                    [
                        "ForbidQI",
                        c,
                        t,
                        FIGSTEP_CATEGORIES[c - 1],
                        f"How to do {c}.{t}?",
                        f"Steps to do {c}.{t}, carefully.",
                    ]
                )
                write_image(root / "images" / split / f"query_ForbidQI_{c}_{t}_6.png", c * 10 + t, "L")
    return root


def make_jsonl(root: Path, n: int = 3) -> Path:
    """``root/samples.jsonl`` (returned) with ids ``"s0"``..: prompt ``"Prompt <i>"``, image
    ``images/s<i>.png`` (relative; the last one absolute), ``category`` ``"cat<i>"`` on even lines,
    ``label`` ``i % 2`` on odd ones; a blank line after the first record."""
    lines = []
    for i in range(n):
        image = write_image(root / "images" / f"s{i}.png", i)
        record: dict[str, Any] = {
            "id": f"s{i}",
            "image": str(image) if i == n - 1 else f"images/s{i}.png",
            "prompt": f"Prompt {i}",
        }
        if i % 2 == 0:
            record["category"] = f"cat{i}"
        else:
            record["label"] = i % 2
        lines.append(json.dumps(record))
        if i == 0:
            lines.append("")
    path = root / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_hades(root: Path, n: int = 3, layout: str = "saved") -> Path:
    """The ``test`` split of Monosail/HADES's columns with rows ``i``: id ``"hades-<i>"``, scenario
    ``HADES_SCENARIOS[i % 5]``, keywords ``"keyword <i>"``, step ``i % 6``, category ``"behavior"`` (even
    i) or ``"object"``, instruction ``"Instruction <i>"``, image ``color(i)`` (RGBA for row 1).
    ``layout="saved"``: ``save_to_disk`` of the split; ``"parquet"``: ``data/test-00000-of-00001.parquet``
    as on the hub."""
    import datasets

    rows = {
        "image": [Image.new("RGB", (4, 4), color(i)).convert("RGBA" if i == 1 else "RGB") for i in range(n)],
        "id": [f"hades-{i}" for i in range(n)],
        "scenario": [HADES_SCENARIOS[i % 5] for i in range(n)],
        "keywords": [f"keyword {i}" for i in range(n)],
        "step": [i % 6 for i in range(n)],
        "category": ["behavior" if i % 2 == 0 else "object" for i in range(n)],
        "instruction": [f"Instruction {i}" for i in range(n)],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "id": datasets.Value("string"),
            "scenario": datasets.Value("string"),
            "keywords": datasets.Value("string"),
            "step": datasets.Value("int64"),
            "category": datasets.Value("string"),
            "instruction": datasets.Value("string"),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features, split=datasets.NamedSplit("test"))
    if layout == "saved":
        dataset.save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def make_msts(root: Path, languages: tuple[str, ...] = ("english", "german"), n: int = 2) -> Path:
    """A ``save_to_disk`` DatasetDict with one split per language, MSTS's columns, rows ``i``: prompt_text
    ``"Should I do this? (<language> <i>)"``, case_id ``"case-<i // 2>"``, prompt_type ``"assistance"``
    (even i) or ``"intention"``, hazard_category ``"Violent Crimes"``, hazard_subcategory ``"Mass
    violence"`` (``None`` for odd i), hazard_subsubcategory ``"Weapons"``, unsafe_image ``color(i)``."""
    import datasets

    def split(language: str) -> datasets.Dataset:
        rows = {
            "hazard_category": ["Violent Crimes"] * n,
            "hazard_subcategory": ["Mass violence" if i % 2 == 0 else None for i in range(n)],
            "hazard_subsubcategory": ["Weapons"] * n,
            "case_id": [f"case-{i // 2}" for i in range(n)],
            "case_text": ["Should I shoot this?"] * n,
            "unsafe_image_id": [f"img-{i}" for i in range(n)],
            "unsafe_image_description": ["a rifle"] * n,
            "prompt_text": [f"Should I do this? ({language} {i})" for i in range(n)],
            "prompt_type": ["assistance" if i % 2 == 0 else "intention" for i in range(n)],
            "unsafe_image_url": ["https://example.org/x.jpg"] * n,
            "unsafe_image_license": ["CC-BY"] * n,
            "unsafe_image_cw": ["weapons"] * n,
            "unsafe_image": [Image.new("RGB", (4, 4), color(i)) for i in range(n)],
        }
        features = datasets.Features(
            {name: datasets.Image() if name == "unsafe_image" else datasets.Value("string") for name in rows}
        )
        return datasets.Dataset.from_dict(rows, features=features)

    datasets.DatasetDict({language: split(language) for language in languages}).save_to_disk(str(root))
    return root
