"""A ``CLIPTokenizer`` for the toy vocabulary in which every word is a single token.

CLIP's tokenizer is byte-level BPE: a word starts as characters (the last one carrying
the ``</w>`` end-of-word marker) and pairs are merged by rank. We start from CLIP's 512
base symbols (256 byte characters, with and without ``</w>``) and, for each toy word in
turn, append the merges that BPE needs to reach the whole word. A merge appended later
has the lowest priority, so it never changes how earlier words are split. The files are
written in CLIP's format and load with ``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

from receler.toyworld.vocab import all_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 mapping from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` with CLIP's BPE rule (lowest-rank adjacent pair first)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):  # merge every occurrence of (a, b), as CLIP does
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and ordered merges making each word one token."""
    words = words if words is not None else all_words()
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(tokens)
    for w in words:
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                tokens.append(pair[0] + pair[1])
            parts = _bpe(w, ranks)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | Path, *, model_max_length: int = 48,
                    words: list[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into ``folder``.

    Args:
        folder: target folder (created if missing), e.g. ``<pipeline>/tokenizer``.
        model_max_length: padded prompt length; must leave room for 16 soft tokens.
        words: the single-token words (default: the toy vocabulary).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def build_tokenizer(folder: str | Path, *, model_max_length: int = 48,
                    words: list[str] | None = None):
    """Write the tokenizer files into ``folder`` and load them as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(write_tokenizer(folder, model_max_length=model_max_length, words=words))
    )
