"""An offline CLIP tokenizer: vocab.json + merges.txt built by raybias, no download.

The vocabulary follows CLIP's layout: the 256 byte-level symbols, the same with the
end-of-word marker `</w>`, then one entry per BPE merge, then the two special tokens.
Every word the task needs (digit words, colour names, "a", identifier tokens such as
"sks", ...) gets a chain of merges that fuses it into ONE token; any other lowercase
ASCII text still tokenizes, into byte-level pieces (the fallback), never an error.

The files load with stock `transformers.CLIPTokenizer.from_pretrained(folder)`, so a
pipeline saved with this tokenizer loads with stock diffusers.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Sequence, Tuple

from raybias.palette import COLOR_RGB

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Colours known to the builtin backbone beyond the task's: the corpus palette.
EXTRA_COLOR_WORDS = ["gray", "magenta"]
# Rare identifier tokens (DreamBooth binds one of them to a group's look).
IDENTIFIERS = ["sks", "zwx", "qlo", "vkz", "pqr"]
# Words of the caption templates and common prompt words, so ordinary prompts stay short.
COMMON_WORDS = [
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image", "drawing",
    "digit", "number", "handwritten", "written", "colored", "coloured", "color", "colour",
    "black", "background", "person", "bird", "man", "woman", "male", "female", "blond",
    "hair", "young", "old", "face", "water", "land", "smiling", "serious", "celebrity",
]


def default_words() -> List[str]:
    """The words the builtin vocabulary makes into single tokens."""
    words = DIGIT_WORDS + list(COLOR_RGB) + EXTRA_COLOR_WORDS + IDENTIFIERS + COMMON_WORDS
    return list(dict.fromkeys(w.lower() for w in words))


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (byte-level BPE)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _word_symbols(word: str, byte_map: Dict[int, str]) -> List[str]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + EOW
    return chars


def _apply_merges(symbols: List[str], ranks: Dict[Tuple[str, str], int]) -> List[str]:
    """BPE: repeatedly fuse the adjacent pair with the lowest merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best, best_i = None, -1
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        symbols[best_i:best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
    return symbols


def build_vocab(words: Iterable[str]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """(vocab, merges) making each of `words` a single token, with a byte-level fallback.

    Merges for a word are appended after all earlier ones, starting from the symbols the
    earlier merges already leave; a later (lower-priority) merge never fires inside an
    earlier word, because that word always has a higher-priority merge available until it
    is one symbol.
    """
    byte_map = _bytes_to_unicode()
    base = [byte_map[b] for b in sorted(byte_map)]
    vocab_list: List[str] = base + [s + EOW for s in base]
    known = set(vocab_list)
    merges: List[Tuple[str, str]] = []
    ranks: Dict[Tuple[str, str], int] = {}
    for word in dict.fromkeys(w.strip().lower() for w in words):
        if not word or any(c.isspace() for c in word):
            continue
        symbols = _apply_merges(_word_symbols(word, byte_map), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            fused = pair[0] + pair[1]
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if fused not in known:
                known.add(fused)
                vocab_list.append(fused)
            symbols = [fused] + symbols[2:]
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: str, words: Iterable[str] | None = None) -> Tuple[str, str]:
    """Write vocab.json and merges.txt (CLIP's file formats) into `folder`."""
    vocab, merges = build_vocab(default_words() if words is None else words)
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab_path, merges_path


def build_tokenizer(words: Sequence[str] | None = None, model_max_length: int = 32):
    """A stock `CLIPTokenizer` over the offline vocabulary."""
    from transformers import CLIPTokenizer

    all_words = default_words() + [w for w in (words or []) if w]
    vocab, merges = build_vocab(all_words)
    return CLIPTokenizer(vocab=vocab, merges=list(merges),
                         model_max_length=model_max_length)
