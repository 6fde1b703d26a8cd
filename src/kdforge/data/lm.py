"""Token data for causal language models: packed text, prompt/response pairs, and their batches.

Two readers, both tokenizing once:

- :func:`packed_text_blocks`: a plain text file, tokenized whole and cut into blocks
  of ``max_length`` tokens (every token after a block's first is a target);
- :func:`prompt_response_examples`: JSONL with one ``{prompt, response}`` object per
  line, rendered with the tokenizer's chat template when it has one; only the
  response's tokens are targets.

:func:`collate_causal` pads a list of examples into the batch every causal-LM
adapter and loss reads; see its docstring for the keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdforge.data.paths import resolve_data_path as find_data_path
from kdforge.errors import RecipeError


@dataclass
class TokenExample:
    input_ids: torch.Tensor  # [L] int64
    counted: torch.Tensor  # [L] bool: the token is a target (predicted from the tokens before it)
    #: which of a multi-task run's tasks the example belongs to (distilling step-by-step: label, rationale)
    kind: str | None = None
    #: the prompt as written (prompt/response data), for showing answers next to it
    prompt: str | None = None


class TokenDataset(Dataset):
    def __init__(self, examples: list[TokenExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenExample:
        return self.examples[i]


#: prefix of the data files kdforge ships (the demo's instruction prompts)
BUILTIN = "builtin:"


def resolve_data_path(path: str, field: str = "data.path") -> Path:
    """``path`` as given, else relative to ``KDFORGE_DATA_DIR`` (where shared datasets live).

    ``builtin:NAME`` is a data file shipped with kdforge (``builtin:instructions.jsonl``).
    """
    if path.startswith(BUILTIN):
        from importlib import resources

        name = path[len(BUILTIN) :]
        shipped = sorted(p.name for p in (resources.files("kdforge") / "demo").iterdir() if p.name.endswith(".jsonl"))
        if name not in shipped:
            raise RecipeError(f"{field}: kdforge ships no {name!r}; built-in data: {', '.join(shipped)}")
        return Path(str(resources.files("kdforge") / "demo" / name))
    found = find_data_path(path, field)
    if not found.is_file():
        raise RecipeError(f"{field}: {path} is a folder; point at the file itself")
    return found


def _read_text(file: Path, field: str) -> str:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{field}: {file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"{field}: cannot read {file} ({exc.strerror})") from None
    if not text.strip():
        raise RecipeError(f"{field}: {file} is empty")
    return text


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without the tokenizer's own special tokens (templates and packing place those)."""
    if not texts:
        return []
    # verbose=False: a whole file is longer than the model's context, which is fine here (it is cut next)
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def packed_text_blocks(file: Path, tokenizer, max_length: int, field: str = "data.path") -> list[TokenExample]:
    """The file's tokens in consecutive blocks of ``max_length``; a shorter tail is kept only if it is all."""
    ids = torch.tensor(_encode(tokenizer, [_read_text(file, field)])[0], dtype=torch.long)
    if len(ids) < 2:
        raise RecipeError(f"{field}: {file} holds only {len(ids)} token(s); a language model needs at least 2")
    full = len(ids) // max_length
    blocks = list(ids[: full * max_length].split(max_length)) if full else [ids]
    return [TokenExample(block, torch.ones(len(block), dtype=torch.bool)) for block in blocks]


def read_pairs(
    file: Path, prompt_field: str, response_field: str, field: str = "data.path", *, need_response: bool = True
) -> list[tuple[str, str | None]]:
    """(prompt, response) per JSON line; without ``need_response`` a missing response is None."""
    pairs = []
    for number, line in enumerate(_read_text(file, field).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{field}: {file} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RecipeError(f"{field}: {file} line {number} is a JSON {type(record).__name__}, not an object")
        values = []
        for key, setting in ((prompt_field, "data.prompt_field"), (response_field, "data.response_field")):
            if key not in record and key == response_field and not need_response:
                values.append(None)
                continue
            if key not in record:
                raise RecipeError(
                    f"{setting}: {file} line {number} has no {key!r} field (it has {', '.join(map(repr, record))});"
                    f" set {setting} to the name your file uses"
                )
            if not isinstance(record[key], str):
                raise RecipeError(
                    f"{setting}: {file} line {number}: {key!r} is a {type(record[key]).__name__}, not a string"
                )
            values.append(record[key])
        pairs.append((values[0], values[1]))
    return pairs


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


#: a prompt: a text (the user's turn), or a conversation up to the answer (chat ``messages``)
Prompt = str | list[dict[str, Any]]


def _as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_text(prompt: Prompt) -> str:
    """A prompt as a person reads it next to the answers: the text, or the conversation's last turn."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""


def _render_chats(tokenizer, pairs: list[tuple[Prompt, str | None]]) -> tuple[list[str], list[str]]:
    """Each pair as the prompt alone (up to the assistant's turn) and as the whole conversation.

    A pair without a response renders only the prompt (the conversation is left empty).
    """
    from jinja2 import TemplateError

    prompts, conversations = [], []
    try:
        for prompt, response in pairs:
            turns = _as_messages(prompt)
            prompts.append(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
            if response is None:
                conversations.append("")
                continue
            assistant = {"role": "assistant", "content": response}
            conversations.append(tokenizer.apply_chat_template([*turns, assistant], tokenize=False))
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise RecipeError(
            f"data.chat_template: the tokenizer's chat template fails on a conversation ({exc});"
            " set data.chat_template: false to concatenate prompt and response instead"
        ) from None
    return prompts, conversations


def _plain(prompt: Prompt) -> str:
    """A conversation without a chat template: its turns' texts, one per line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(turn.get("content", "")) for turn in prompt)


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer, prompts: list[Prompt], *, chat_template: bool = True) -> list[list[int]]:
    """Each prompt as the model sees it before its answer: the chat up to the assistant's turn, or [BOS] prompt."""
    if uses_chat_template(tokenizer, chat_template):
        rendered, _ = _render_chats(tokenizer, [(p, None) for p in prompts])
        return _encode(tokenizer, rendered)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in _encode(tokenizer, [_plain(p) for p in prompts])]


def encode_pairs(
    tokenizer,
    pairs: list[tuple[Prompt, str]],
    max_length: int,
    *,
    chat_template: bool = True,
    kind: str | None = None,
) -> list[TokenExample | None]:
    """Each pair as one example with only the response counted; None where the prompt leaves no room for it.

    With a chat template the user turn is the prompt and the assistant turn the response;
    the prompt's tokens are those of the conversation rendered up to the assistant's
    turn (with the generation prompt), which every common template renders as a prefix
    of the whole conversation (where one does not, the shared prefix is taken).
    Without a template: [BOS] prompt response [EOS], the two tokenized separately so the
    boundary is exact. Examples longer than ``max_length`` are cut at the end; one whose
    response is cut away entirely teaches nothing, and comes back as None.
    """
    if uses_chat_template(tokenizer, chat_template):
        prompts, full_texts = _render_chats(tokenizer, pairs)
        sequences = []
        for prompt_ids, full_ids in zip(_encode(tokenizer, prompts), _encode(tokenizer, full_texts)):
            sequences.append((full_ids, _common_prefix(prompt_ids, full_ids)))
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt_ids = _encode(tokenizer, [_plain(p) for p, _ in pairs])
        response_ids = _encode(tokenizer, [r for _, r in pairs])
        sequences = [(bos + p + r + eos, len(bos) + len(p)) for p, r in zip(prompt_ids, response_ids)]

    examples: list[TokenExample | None] = []
    for ids, prompt_length in sequences:
        ids = ids[:max_length]
        counted = torch.zeros(len(ids), dtype=torch.bool)
        counted[prompt_length:] = True
        counted[0] = False  # nothing predicts the first token
        examples.append(TokenExample(torch.tensor(ids, dtype=torch.long), counted, kind) if counted.any() else None)
    for example, (prompt, _) in zip(examples, pairs):
        if example is not None:
            example.prompt = prompt_text(prompt)
    return examples


def prompt_response_examples(
    file: Path,
    tokenizer,
    max_length: int,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    chat_template: bool = True,
    field: str = "data.path",
) -> tuple[list[TokenExample], int]:
    """The file's prompt/response examples (see :func:`encode_pairs`) and how many had to be dropped."""
    pairs = read_pairs(file, prompt_field, response_field, field)
    if not pairs:
        raise RecipeError(f"{field}: {file} holds no JSON lines")
    encoded = encode_pairs(tokenizer, pairs, max_length, chat_template=chat_template)  # type: ignore[arg-type]
    examples = [e for e in encoded if e is not None]
    return examples, len(encoded) - len(examples)


def collate_causal(items: list[TokenExample], pad_id: int, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    """Right-padded batch of B examples, L = the longest; the targets are shifted by one.

    - ``input_ids`` [B, L] (``pad_id`` after each example's end), ``attention_mask`` [B, L];
    - ``labels`` [B, L-1]: ``input_ids[:, 1:]``, -100 where a token is not a target;
    - ``loss_mask`` [B, L-1] bool: ``labels != -100`` (real tokens; for prompt/response
      data, response tokens only);
    - ``position_mask`` [B, L-1] bool: ``attention_mask[:, 1:]``, the real positions of the
      shifted logits (a teacher cache stores exactly these);
    - ``<kind>_mask`` [B, L-1] bool for each of ``kinds``: ``loss_mask`` on the examples of
      that kind only (every batch has every kind's mask, all False when none is present).

    ``logits[:, j]`` (the model's output at position j) predicts ``labels[:, j]``.
    """
    length = max(len(it.input_ids) for it in items)
    if length < 2:
        raise RecipeError("data.max_length: examples of one token predict nothing; use max_length >= 2")
    batch_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    counted = torch.zeros((len(items), length), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        batch_ids[row, :n] = item.input_ids
        attention[row, :n] = 1
        counted[row, :n] = item.counted
    loss_mask = counted[:, 1:] & attention[:, 1:].bool()
    labels = torch.where(loss_mask, batch_ids[:, 1:], torch.full_like(batch_ids[:, 1:], -100))
    batch = {
        "input_ids": batch_ids,
        "attention_mask": attention,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_mask": attention[:, 1:].bool(),
    }
    for kind in kinds:
        rows = torch.tensor([item.kind == kind for item in items], dtype=torch.bool)
        batch[f"{kind}_mask"] = loss_mask & rows[:, None]
    return batch
