"""Helpers shared by the ``jax-bq`` subcommands: errors, JSON output, model folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["SIDE_FILES", "CommandError", "copy_side_files", "emit", "model_dir", "progress"]

#: Files of a Hugging Face / sentence-transformers model folder that are not
#: weights; ``quantize`` copies them so the output folder is a model folder too.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status 1."""


def model_dir(path: str, what: str = "model folder") -> Path:
    """``path`` as a folder holding ``config.json`` + ``model.safetensors``, else CommandError.

    ``"minilm"`` (when no such folder exists) is the installed all-MiniLM-L6-v2
    (:func:`jax_bq.models.minilm_dir`).
    """
    d = Path(path)
    if path == "minilm" and not d.exists():
        from jax_bq.models.loading import minilm_dir

        try:
            d = minilm_dir()
        except FileNotFoundError as e:
            raise CommandError(str(e)) from None
    if not d.exists():
        raise CommandError(f"{what} {path} does not exist")
    if not d.is_dir():
        raise CommandError(f"{what} {path} is not a folder")
    for f in ("config.json", "model.safetensors"):
        if not (d / f).is_file():
            raise CommandError(f"{what} {path} has no {f} (expected a Hugging Face model folder)")
    return d


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer/pooling files of ``src`` that exist into ``dst``."""
    from jax_bq.io.safetensors_file import write_atomic

    done = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            write_atomic(dst / name, (src / name).read_bytes())
            done.append(name)
    return done


def emit(args, result: dict, text: str) -> None:
    """Prints ``result`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def progress(iterable=None, **kw):
    """A tqdm bar on stderr (disabled when stderr is not a terminal unless forced)."""
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("disable", None)  # tqdm: disable on non-tty
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
