"""Causal-LM examples from any table (``data.source``/``data.files``), in the layouts TRL reads.

- plain text (column ``text``): every row's text, one after another with the tokenizer's
  end-of-text token between them, packed into blocks of ``max_length`` tokens; with
  ``streaming`` the rows are read as a stream and their tokens written to a file under
  ``KDFORGE_CACHE_DIR`` that the blocks are read from, so memory stays flat however large
  the data (:class:`TokenFileBlocks`);
- records: ``prompt`` and ``response`` (kdforge's JSONL), ``prompt`` and ``completion``
  (TRL's prompt-completion, each a text or, conversational, a list of messages), or
  ``messages`` (TRL's conversational: the last assistant turn is the response, every turn
  before it the prompt, rendered with the chat template; its tokens are not learned).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.data.lm import Prompt, TokenExample
from kdforge.data.table import SourceFields, data_files, read_table, stream_column, table_columns
from kdforge.errors import DataError
from kdforge.settings import cache_dir

#: the record layouts, by the columns that give them (checked in this order)
LAYOUTS = (("messages",), ("prompt", "completion"), ("prompt", "response"))


def _layout(fields: SourceFields, present: list[str]) -> tuple[str, ...]:
    mapped = [layout for layout in LAYOUTS if all(role in fields.columns for role in layout)]
    if mapped:
        return mapped[0]
    for layout in LAYOUTS:
        if all(fields.columns.get(role, role) in present for role in layout):
            return layout
    raise DataError(
        f"data.columns: the file has no messages column, and no prompt with a response or completion (its"
        f" columns: {', '.join(present)}); map them, e.g. columns: {{prompt: question, response: answer}}"
    )


def _turns(value: Any) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        return None
    return value


def _answer(value: Any) -> str | None:
    """A response or completion: a text, or (conversational) the assistant turns' texts."""
    if isinstance(value, str):
        return value
    turns = _turns(value)
    if turns is None:
        return None
    return "".join(str(t["content"]) for t in turns if t["role"] == "assistant") or None


def read_records(
    fields: SourceFields, *, need_response: bool = True
) -> tuple[list[tuple[Prompt, str | None]], list[str]]:
    """(prompt, response) of every row of every split, in order, and the split each row came from."""
    layout = _layout(fields, table_columns(fields))

    def check(row: dict[str, Any]) -> str | None:
        if layout == ("messages",):
            turns = _turns(row["messages"])
            if not turns:
                return "has no messages (a list of {role, content})"
            if need_response and turns[-1]["role"] != "assistant":
                return "has messages that do not end with an assistant turn"
            return None
        if not isinstance(row["prompt"], str) and _turns(row["prompt"]) is None:
            return "has a prompt that is neither a text nor a list of messages"
        answer = row.get(layout[1])
        if need_response and (answer is None or not (_answer(answer) or "").strip()):
            return f"has no {layout[1]}"
        return None

    roles = {layout[0]: True}
    if len(layout) > 1:
        roles[layout[1]] = need_response  # the teacher writes the answers: the column may be absent
    # a prompt from several columns (a passage and its question) is their texts joined
    joined = tuple(role for role in ("prompt", "response", "completion") if isinstance(fields.columns.get(role), list))
    table = read_table(fields, roles, texts=joined, row_check=check)
    records: list[tuple[Prompt, str | None]] = []
    splits: list[str] = []
    for split in ("train", "validation", "test"):
        values = table.splits.get(split)
        if values is None:
            continue
        if layout == ("messages",):
            for turns in values["messages"]:
                if turns[-1]["role"] == "assistant":
                    records.append((turns[:-1], str(turns[-1]["content"])))
                else:
                    records.append((turns, None))
        else:
            answers = values.get(layout[1], [None] * len(values["prompt"]))
            for prompt, answer in zip(values["prompt"], answers):
                records.append((prompt, _answer(answer) if answer is not None else None))
        splits += [split] * (len(records) - len(splits))
    return records, splits


def read_texts(fields: SourceFields) -> dict[str, list[str]]:
    """The ``text`` column of each split the data gives, in order."""
    table = read_table(fields, {"text": True}, texts=("text",))
    return {split: values["text"] for split, values in table.splits.items()}


def pack(ids: list[int] | np.ndarray, max_length: int, field: str = "data.files") -> list[TokenExample]:
    """Tokens in consecutive blocks of ``max_length``; a shorter tail is kept only if it is all."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if len(ids) < 2:
        raise DataError(f"{field}: the data holds only {len(ids)} token(s); a language model needs at least 2")
    full = len(ids) // max_length
    blocks = list(ids[: full * max_length].split(max_length)) if full else [ids]
    return [TokenExample(block, torch.ones(len(block), dtype=torch.bool)) for block in blocks]


def joined_ids(tokenizer, texts: list[str]) -> list[int]:
    """The texts' tokens one after another, the end-of-text token between two texts."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[int] = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        out += (separator if i else []) + ids
    return out


class TokenFileBlocks(Dataset):
    """Blocks of ``max_length`` tokens read from a token file on demand (streamed data)."""

    def __init__(self, path: Path, max_length: int):
        self.tokens = np.load(path, mmap_mode="r")
        self.max_length = max_length
        self.count = len(self.tokens) // max_length if len(self.tokens) >= max_length else 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> TokenExample:
        if not 0 <= i < self.count:
            raise IndexError(i)
        block = torch.from_numpy(np.array(self.tokens[i * self.max_length : (i + 1) * self.max_length], np.int64))
        return TokenExample(block, torch.ones(len(block), dtype=torch.bool))

    def largest_token_id(self) -> int:
        return int(self.tokens.max())


def streamed_token_file(fields: SourceFields, tokenizer, split: str = "train", *, chunk_rows: int = 1000) -> Path:
    """One split's ``text`` tokens, streamed and written once to a ``.npy`` file under the cache folder.

    The file's name is the hash of the data files, the column mapping and the tokenizer, so
    another run over the same data reuses it; it is written whole, then renamed into place.
    """
    digest = hashlib.sha256()
    for path in data_files(fields):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps([fields.source, fields.columns, fields.read_options], sort_keys=True).encode())
    digest.update(f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}:{split}".encode())
    target = cache_dir() / "tokens" / f"{digest.hexdigest()[:24]}.npy"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint32 if len(tokenizer) >= 2**16 else np.uint16
    raw = target.with_suffix(".tmp")
    count = 0
    with raw.open("wb") as handle:
        for ids in _streamed_ids(fields, tokenizer, split, chunk_rows):
            np.asarray(ids, dtype=dtype).tofile(handle)
            count += len(ids)
    if count < 2:
        raw.unlink()
        raise DataError(f"data.files: the {split} split holds only {count} token(s); a language model needs at least 2")
    # a .npy header in front of the raw tokens, so np.load maps the file without reading it
    header = _npy_header(dtype, count)
    with raw.open("rb") as body:
        _prepend(target, header, body)
    raw.unlink()
    return target


def _streamed_ids(fields: SourceFields, tokenizer, split: str, chunk_rows: int) -> Iterator[list[int]]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chunk: list[str] = []
    first = True
    for text in stream_column(fields, "text", split=split):
        chunk.append(text)
        if len(chunk) == chunk_rows:
            yield _chunk_ids(tokenizer, chunk, separator, first)
            chunk, first = [], False
    if chunk:
        yield _chunk_ids(tokenizer, chunk, separator, first)


def _chunk_ids(tokenizer, texts: list[str], separator: list[int], first: bool) -> list[int]:
    ids = joined_ids(tokenizer, texts)
    return ids if first else separator + ids


def _npy_header(dtype: Any, count: int) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)}
    )
    return buffer.getvalue()


def _prepend(target: Path, header: bytes, body) -> None:
    """Write header + body to ``target`` in pieces (a large token file never sits in memory), then rename."""
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        out.write(header)
        while piece := body.read(1 << 24):
            out.write(piece)
    partial.replace(target)
