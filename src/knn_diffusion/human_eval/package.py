"""Package a pairwise preference study of two systems: task pages, MTurk batch files and the key.

A system is a ``generate``-style folder (``<i>-<slug>.png`` beside a JSON sidecar holding its
``prompt``). Images of A and B are paired by prompt text, a seeded draw picks ``n_pairs`` of them and
puts A on the left in exactly half of the pairs, and the images are renamed to ``<pair>-left/right.png``
so nothing a rater sees tells A from B. Which side is A lives only in the key file, kept apart from the
package folder that is uploaded or handed to raters.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from knn_diffusion.io import write_json, write_text

QUESTIONS = {
    "quality": "Which image is of a higher quality?",
    "alignment": "Which image best matches the text?",
    # Manipulation (paper 4.2): each image shows the input (left) and an edit of it (right).
    "edit_alignment": "Which edit matches the text better?",
    "edit_identity": "Which edit keeps the original object better?",
}
SHOWS_PROMPT = {"quality": False, "alignment": True, "edit_alignment": True, "edit_identity": True}
SIDES = ("left", "right")
MTURK_COLUMNS = ("image_a_url", "image_b_url", "prompt", "pair_id", "question", "package_id")
IMAGES = "images"
MANIFEST = "package.json"


@dataclass(frozen=True)
class SystemOutputs:
    """One system's images, in its folder's order, and the MLflow run that made them (if recorded)."""

    folder: Path
    prompts: list[str]
    images: list[Path]
    model_run_id: str


@dataclass(frozen=True)
class Pair:
    pair_id: str
    prompt: str
    a_image: Path
    b_image: Path
    a_side: str  # "left" | "right": where system A's image is shown


def read_system(folder: str | os.PathLike) -> SystemOutputs:
    """Every (prompt, image) of a generate-style folder; sidecars without a prompt are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of generated images (expected <i>-<slug>.png + .json)")
    prompts, images, run_ids = [], [], []
    for sidecar in sorted(folder.glob("*.json")):
        record = json.loads(sidecar.read_text())
        if not isinstance(record, dict) or not record.get("prompt"):
            continue
        image = folder / record.get("image", sidecar.with_suffix(".png").name)
        if not image.is_file():
            raise FileNotFoundError(f"{sidecar}: its image {image.name} is missing")
        prompts.append(str(record["prompt"]))
        images.append(image)
        run_ids.append(record.get("model_run_id") or "")
    if not prompts:
        raise ValueError(f"{folder}: no JSON sidecar with a 'prompt' (expected generate's output format)")
    return SystemOutputs(folder, prompts, images, next((r for r in run_ids if r), ""))


def _occurrences(prompts: Sequence[str]) -> list[tuple[str, int]]:
    """(prompt, how many times it appeared before): a prompt repeated in both folders pairs in order."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        keys.append((prompt, seen.get(prompt, 0)))
        seen[prompt] = seen.get(prompt, 0) + 1
    return keys


def make_pairs(a: SystemOutputs, b: SystemOutputs, n_pairs: int, seed: int) -> list[Pair]:
    """Pair A and B by prompt, draw ``n_pairs`` of them (all when fewer), shuffle, balance the sides."""
    b_by_key = dict(zip(_occurrences(b.prompts), b.images))
    common = [(key, image) for key, image in zip(_occurrences(a.prompts), a.images) if key in b_by_key]
    if not common:
        raise ValueError(f"{a.folder} and {b.folder}: no prompt in common, nothing to compare")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(common))[:n_pairs]  # a random subset in a random order
    count = len(chosen)
    sides = rng.permutation([SIDES[0]] * ((count + 1) // 2) + [SIDES[1]] * (count // 2))
    return [Pair(f"p{i + 1:04d}", common[j][0][0], common[j][1], b_by_key[common[j][0]], str(side))
            for i, (j, side) in enumerate(zip(chosen, sides))]


def _png_bytes(path: Path) -> bytes:
    """Re-encode as a plain RGB PNG: no metadata from the producing system reaches the raters."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _template(name: str) -> str:
    return (files("knn_diffusion.human_eval") / "templates" / name).read_text(encoding="utf-8")


def _script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, ensure_ascii=False, indent=1).replace("</", "<\\/")


def task_page(package_id: str, question: str, pairs: list[dict]) -> str:
    """The self-contained page for one question: pairs, question and storage key embedded, no network."""
    task = {"package_id": package_id, "question": question, "question_text": QUESTIONS[question],
            "show_prompt": SHOWS_PROMPT[question], "pairs": pairs}
    return (_template("task.html").replace("__TITLE__", html.escape(QUESTIONS[question]))
            .replace("__TASK_JSON__", _script_json(task)))


def hit_layout(question: str) -> str:
    """The MTurk HIT layout (crowd-html-elements) for one question; ``${...}`` are MTurk's batch columns."""
    prompt_block = '<p class="prompt">&ldquo;${prompt}&rdquo;</p>' if SHOWS_PROMPT[question] else ""
    return _template("hit.html").replace("__PROMPT_BLOCK__", prompt_block)


def mturk_input_csv(package_id: str, question: str, pairs: list[dict], base_url: str) -> str:
    """MTurk batch input: one HIT per pair; ``image_a_url`` is the LEFT image, not system A."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MTURK_COLUMNS)
    for pair in pairs:
        writer.writerow([base_url + pair["left"], base_url + pair["right"], pair["prompt"], pair["pair_id"],
                         QUESTIONS[question], package_id])
    return out.getvalue()


def _readme(package_id: str, questions: Sequence[str], raters: int, count: int, base_url: str) -> str:
    pages = ", ".join(f"`{q}.html`" for q in questions)
    return f"""# Human evaluation package {package_id}

{count} image pairs; each should be judged by {raters} raters per question.

## With your own raters
Give each rater this folder (or a copy). They open {pages} in a browser (works offline), enter their
rater id, answer with the left/right arrow keys (Backspace or U undoes the last answer) and press
"Download answers (CSV)" at the end. Answers survive closing the page until downloaded. Collect the CSV
files in the results folder named in the aggregate stage's `results_dir` (`human_eval_aggregate` for
generated images, `human_eval_aggregate_manipulation` for edits).

## On Mechanical Turk
Upload this folder so that `{base_url or '<base_url>'}images/...` serves the images, create one project
per question with `mturk/<question>-layout.html` as its layout and {raters} assignments per HIT, publish
a batch from `mturk/<question>-input.csv`, and download the batch results CSV into the results folder.
`image_a_url` is the image shown on the left.
"""


def write_package(pairs: list[Pair], package_dir: str | os.PathLike, key_path: str | os.PathLike, *,
                  a: SystemOutputs, b: SystemOutputs, name_a: str, name_b: str, questions: Sequence[str],
                  raters: int, base_url: str = "", seed: int = 0) -> dict:
    """Write the rater-facing package into ``package_dir`` and the key to ``key_path``; returns the key.

    The package id hashes what raters see (pairs, prompts, image bytes, questions, raters) and is
    written in every task row and CSV line, so results can be checked against the key they belong to.
    """
    unknown = sorted(set(questions) - set(QUESTIONS))
    if unknown or not questions or len(set(questions)) != len(questions):
        raise ValueError(f"questions {list(questions)}: expected a non-empty subset of {sorted(QUESTIONS)}, each once")
    if raters < 1:
        raise ValueError(f"raters={raters}: expected at least 1")
    if base_url and not base_url.endswith("/"):
        base_url += "/"
    package_dir = Path(package_dir)
    (package_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([list(questions), raters]).encode())
    shown = []
    for pair in pairs:
        left, right = (pair.a_image, pair.b_image) if pair.a_side == "left" else (pair.b_image, pair.a_image)
        entry = {"pair_id": pair.pair_id, "prompt": pair.prompt}
        for side, source in (("left", left), ("right", right)):
            data = _png_bytes(source)
            entry[side] = f"{IMAGES}/{pair.pair_id}-{side}.png"
            (package_dir / entry[side]).write_bytes(data)
            digest.update(data)
        digest.update(json.dumps([pair.pair_id, pair.prompt]).encode())
        shown.append(entry)
    package_id = digest.hexdigest()[:16]
    for question in questions:
        write_text(package_dir / f"{question}.html", task_page(package_id, question, shown))
        write_text(package_dir / "mturk" / f"{question}-input.csv", mturk_input_csv(package_id, question, shown,
                                                                                    base_url))
        write_text(package_dir / "mturk" / f"{question}-layout.html", hit_layout(question))
    write_text(package_dir / "README.md", _readme(package_id, questions, raters, len(shown), base_url))
    write_json(package_dir / MANIFEST, {"package_id": package_id, "pairs": len(shown), "raters": raters,
                                        "questions": {q: QUESTIONS[q] for q in questions}})
    key = {
        "package_id": package_id, "seed": seed, "raters": raters, "questions": list(questions),
        "system_a": {"name": name_a, "folder": str(a.folder), "model_run_id": a.model_run_id},
        "system_b": {"name": name_b, "folder": str(b.folder), "model_run_id": b.model_run_id},
        "pairs": [{**asdict(pair), "a_image": pair.a_image.name, "b_image": pair.b_image.name} for pair in pairs],
    }
    write_json(key_path, key)
    return key


def package_size(package_dir: str | os.PathLike) -> int:
    """Bytes of every file in the package (what a rater downloads or a user uploads)."""
    return sum(p.stat().st_size for p in Path(package_dir).rglob("*") if p.is_file())
