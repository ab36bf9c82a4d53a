"""Reader for the official MME benchmark release (``MME_Benchmark_release_version``).

What the layout is, and where that was checked (public sources, read 2026-11):

* ``haotian-liu/LLaVA`` — ``playground/data/eval/MME/convert_answer_to_mme.py`` (``get_gt``): the release root
  holds one folder per category. If a category folder has an ``images/`` sub-folder, its images are there and
  its question files in ``questions_answers_YN/`` (note the spelling: *questions_answers*); otherwise images
  and question files sit side by side in the category folder. Question files are ``<image stem>.txt``; each
  line is ``question<TAB>answer`` (the script does ``line.strip().split('\\t')``, so exactly one tab), the
  answer ``Yes`` or ``No``.
* ``haotian-liu/LLaVA`` — ``playground/data/eval/MME/llava_mme.jsonl``: image ids such as
  ``code_reasoning/0020.png`` (flat) and ``artwork/images/14777.jpg``, ``celebrity/images/tt0080339_..._img_0.jpg``
  (split), two questions per image, non-ASCII text in questions (``musée``).
* The 14 category names and the perception / cognition split come from the MME ``eval_tool`` output quoted in
  ``InternLM/InternLM-XComposer`` — ``eval_mm/mme/MME_Bench.md``. Third-party MME loaders (no stable path to
  cite) list ``artwork, celebrity, landmark, posters, scene`` as the split categories and the other nine as
  flat, ``.png`` images for the four cognition categories and ``.jpg`` for the rest, and quote an
  ``OCR/0001.txt`` that ends in a blank line. This reader does not rely on any of those lists: it detects the
  sub-layout per folder and accepts ``.jpg/.jpeg/.png/.bmp`` in any case.
* Some questions carry two spaces before "Please answer yes or no." (LLaVA's converter works around it), so
  questions are kept verbatim apart from stripping the line ends.

Some downloads nest the categories one level deeper (``MME_Benchmark_release_version/MME_Benchmark/``); a root
without category folders but with a single ``MME_Benchmark`` folder is followed into it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
MME_CATEGORIES: tuple[str, ...] = MME_PERCEPTION + MME_COGNITION
#: Sub-folders of a category in the split layout.
IMAGES_DIR = "images"
QUESTIONS_DIR = "questions_answers_YN"
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
_ANSWERS = {"yes": True, "no": False}


class MMEFormatError(ValueError):
    """The MME folder or one of its files does not follow the release layout; the message names the path."""


@dataclass(frozen=True)
class MMEItem:
    """One MME yes/no question about one image.

    ``image_id`` is the image path relative to the MME root in POSIX form (``artwork/images/10002.jpg``,
    ``OCR/0001.jpg``) — the id LLaVA's MME scripts use; the two questions of an image share it (acc+).
    """

    category: str
    image: Path
    question: str
    answer: bool
    image_id: str


def _find_root(root: Path) -> Path:
    if not root.is_dir():
        raise MMEFormatError(f"{root}: MME root is not a folder — point it at MME_Benchmark_release_version/")
    nested = root / "MME_Benchmark"
    if not any((root / name).is_dir() for name in MME_CATEGORIES) and nested.is_dir():
        logger.info("%s: categories found under %s", root, nested)
        return nested
    return root


def _is_category(folder: Path) -> bool:
    return (folder / QUESTIONS_DIR).is_dir() or any(folder.glob("*.txt"))


def _discover(root: Path) -> list[str]:
    """Category folders under ``root``: official ones in the official order, then any others by name."""
    found = {p.name for p in root.iterdir() if p.is_dir() and _is_category(p)}
    if not found:
        raise MMEFormatError(
            f"{root}: no MME category folders (with .txt question files or {QUESTIONS_DIR}/) — "
            "point the root at the folder that holds existence/, count/, ..."
        )
    return [c for c in MME_CATEGORIES if c in found] + sorted(found - set(MME_CATEGORIES))


def _category_dirs(root: Path, category: str) -> tuple[Path, Path]:
    """(folder of question files, folder of images) for one category, in either sub-layout."""
    folder = root / category
    if not folder.is_dir():
        present = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
        raise MMEFormatError(
            f"{folder}: category folder missing (folders present: {present}) — "
            "fix the category name or download the full MME release"
        )
    questions = folder / QUESTIONS_DIR
    if not questions.is_dir():
        return folder, folder
    images = folder / IMAGES_DIR
    if not images.is_dir():
        raise MMEFormatError(
            f"{folder}: has {QUESTIONS_DIR}/ but no {IMAGES_DIR}/ — put the images in {images} (split layout)"
        )
    return questions, images


def _image_index(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in index:
                raise MMEFormatError(
                    f"{path}: two images share the stem {path.stem!r} ({index[path.stem].name}) — keep one"
                )
            index[path.stem] = path
    return index


def parse_question_file(path: Path) -> list[tuple[str, bool]]:
    """The ``(question, answer)`` pairs of one MME question file; blank lines are skipped.

    Raises:
        MMEFormatError: naming the file and the 1-based line number of a malformed line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MMEFormatError(f"{path}: not UTF-8 text ({exc}) — save the file as UTF-8") from exc
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            found = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            raise MMEFormatError(
                f"{path}, line {lineno}: expected 'question<TAB>Yes|No', found {found} in {line!r:.80} — "
                "separate question and answer with exactly one tab"
            )
        question, answer = parts[0].strip(), parts[1].strip()
        if not question:
            raise MMEFormatError(f"{path}, line {lineno}: empty question — write the question before the tab")
        if answer.lower() not in _ANSWERS:
            raise MMEFormatError(
                f"{path}, line {lineno}: answer {answer!r} is not yes/no — the answer after the tab must be Yes or No"
            )
        pairs.append((question, _ANSWERS[answer.lower()]))
    if not pairs:
        raise MMEFormatError(f"{path}: no questions — each file holds 'question<TAB>Yes|No' lines")
    return pairs


def _read_category(root: Path, category: str) -> list[MMEItem]:
    questions_dir, images_dir = _category_dirs(root, category)
    images = _image_index(images_dir)
    items: list[MMEItem] = []
    not_two: list[str] = []
    question_files = sorted(questions_dir.glob("*.txt"))
    if not question_files:
        raise MMEFormatError(f"{questions_dir}: no .txt question files — download the full MME release")
    for question_file in question_files:
        image = images.get(question_file.stem)
        if image is None:
            raise MMEFormatError(
                f"{question_file}: no image {question_file.stem}.jpg/.png in {images_dir} — "
                "restore the image or remove the question file"
            )
        pairs = parse_question_file(question_file)
        if len(pairs) != 2:
            not_two.append(question_file.name)
        image_id = image.relative_to(root).as_posix()
        items.extend(MMEItem(category, image, q, a, image_id) for q, a in pairs)
    if not_two:
        logger.warning(
            "%s: %d question file(s) do not hold exactly 2 questions (%s); acc+ groups them as they are",
            category,
            len(not_two),
            ", ".join(not_two[:5]),
        )
    return items


def read_mme(root: str | Path, categories: Sequence[str] | None = None) -> list[MMEItem]:
    """Read MME questions from the official release layout.

    Args:
        root: the ``MME_Benchmark_release_version`` folder (or its nested ``MME_Benchmark``).
        categories: which categories to read, in this order; ``None`` reads every category folder present
            (the 14 official ones in the official order, then any others by name).

    Returns:
        One :class:`MMEItem` per question: by category, then by question file name, then line order.

    Raises:
        MMEFormatError: a missing category folder, a question file without its image, or a malformed line
            (the message names the file and line number).
    """
    base = _find_root(Path(root))
    names = list(categories) if categories is not None else _discover(base)
    items: list[MMEItem] = []
    for category in names:
        category_items = _read_category(base, category)
        logger.info("MME %s: %d questions", category, len(category_items))
        items.extend(category_items)
    return items
