"""Aesop's fables as strings of characters for next-character prediction (Hinton 2022, section 4.1).

The paper lower-cases the text, keeps a 30-symbol alphabet (a-z, space, comma, semicolon, full
stop) and takes 248 strings of 100 characters. Cleaning here (:func:`clean_text`):

1. a leading byte-order mark is dropped and the text lower-cased;
2. every whitespace character (line breaks, tabs) becomes a space, so words on both sides of a
   line break stay apart;
3. every other character outside :data:`ALPHABET` is deleted (``"don't"`` -> ``"dont"``,
   ``"well-known"`` -> ``"wellknown"``);
4. runs of spaces become one space and the ends are stripped.

The strings (:func:`aesop_strings`) are consecutive, non-overlapping 100-character chunks of
the cleaned text from its start: string ``i`` is characters ``100 i .. 100 i + 99``. The paper's
248 strings are chunks 0-247; held-out strings are the chunks after them (``first=248``).

Where the text is looked for, first match wins:

1. ``text_file``: a UTF-8 text file named by the user;
2. ``data_dir``: a folder holding :data:`FILENAME`;
3. ``$FF_KERNELS_DATA``: a data root; the text is ``$FF_KERNELS_DATA/aesop/aesop.txt``.

Nothing is downloaded. A missing file raises :class:`AesopMissingError`; a file that is not
UTF-8 or too short for the strings asked for raises :class:`AesopTextError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,;."  # code i is ALPHABET[i]
FILENAME = "aesop.txt"
ENV_VAR = "FF_KERNELS_DATA"
NUM_STRINGS = 248  # section 4.1
STRING_LENGTH = 100  # section 4.1

_CODES = {c: i for i, c in enumerate(ALPHABET)}
_OUTSIDE = re.compile("[^" + re.escape(ALPHABET) + "]")


class AesopMissingError(DataError, FileNotFoundError):
    """The text file is not where it was looked for."""


class AesopTextError(DataError, ValueError):
    """The text file exists but is not UTF-8 or is too short for the strings asked for."""


def clean_text(text: str) -> str:
    """Lower-case ``text`` and reduce it to :data:`ALPHABET` (steps 1-4 of the module docstring)."""
    text = text.removeprefix("\ufeff").lower()
    text = re.sub(r"\s", " ", text)
    text = _OUTSIDE.sub("", text)
    return re.sub(" +", " ", text).strip(" ")


def encode(text: str) -> torch.Tensor:
    """Characters of :data:`ALPHABET` -> int64 codes (len(text),); other characters raise ValueError."""
    try:
        return torch.tensor([_CODES[c] for c in text], dtype=torch.int64)
    except KeyError as err:
        raise ValueError(f"encode: character {err.args[0]!r} is not in the alphabet {ALPHABET!r}") from None


def decode(codes: torch.Tensor) -> str:
    """int64 codes (N,) in [0, 30) -> the string of their characters."""
    if codes.dim() != 1:
        raise ValueError(f"decode: codes must be 1-D, got shape {tuple(codes.shape)}")
    return "".join(ALPHABET[i] for i in codes.tolist())


def find_text(data_dir: str | os.PathLike | None = None, text_file: str | os.PathLike | None = None) -> Path:
    """The path of the text: ``text_file``, else ``data_dir/aesop.txt``, else ``$FF_KERNELS_DATA/aesop/aesop.txt``."""
    if text_file is not None:
        candidates = [Path(text_file)]
    elif data_dir is not None:
        candidates = [Path(data_dir) / FILENAME]
    elif os.environ.get(ENV_VAR):
        candidates = [Path(os.environ[ENV_VAR]) / "aesop" / FILENAME]
    else:
        raise AesopMissingError(
            f"no Aesop text given: pass a folder holding {FILENAME} (--data-dir), a text file (--text), "
            f"or set ${ENV_VAR} to a data root with aesop/{FILENAME}"
        )
    path = candidates[0]
    if not path.is_file():
        raise AesopMissingError(f"Aesop text not found: {path} is not a file")
    return path


def read_clean_text(path: str | os.PathLike) -> str:
    """The cleaned text (:func:`clean_text`) of the UTF-8 file ``path``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AesopTextError(f"{path} is not UTF-8 text ({err})") from None
    return clean_text(text)


def chunk_strings(text: str, num_strings: int, length: int, first: int = 0, source: str = "the text") -> torch.Tensor:
    """Chunks ``first .. first + num_strings - 1`` of ``length`` characters of a cleaned ``text``.

    Returns int64 codes (num_strings, length). Raises :class:`AesopTextError` when the text has
    fewer than ``(first + num_strings) * length`` characters.
    """
    for name, value, low in (("num_strings", num_strings, 1), ("length", length, 1), ("first", first, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    needed = (first + num_strings) * length
    if len(text) < needed:
        raise AesopTextError(
            f"{source} has {len(text)} characters after cleaning; strings {first}..{first + num_strings - 1} "
            f"of {length} characters need {needed}"
        )
    return encode(text[first * length:needed]).view(num_strings, length)


def aesop_strings(
    data_dir: str | os.PathLike | None = None,
    num_strings: int = NUM_STRINGS,
    length: int = STRING_LENGTH,
    first: int = 0,
    text_file: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The strings of the text found by :func:`find_text`: int64 codes (num_strings, length).

    String ``i`` is characters ``(first + i) * length ..`` of the cleaned text (see the module docstring).
    """
    path = find_text(data_dir, text_file)
    return chunk_strings(read_clean_text(path), num_strings, length, first, source=str(path))
