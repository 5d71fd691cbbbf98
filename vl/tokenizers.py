"""Text tokenizers for image-text models (M3AE) behind one small interface.

Every tokenizer turns a batch of captions into ``ids (B, S)`` and an explicit padding mask
``pad (B, S)`` (``True`` = padding) with S == ``max_len``: right padding, truncation that keeps the
end token. The mask is never inferred from the pad id, because for open_clip's BPE id 0 is the real
token ``"!"`` (e.g. ``"!?!?!"`` encodes to ``[0, 16349]``).

Three back ends, all offline (no hub downloads at run time):

- ``OpenClipBPE``: CLIP's byte-level BPE; its vocabulary ships inside the open_clip package.
- ``HFTokenizer``: any Hugging Face tokenizer saved in a local directory.
- ``WordPieceTokenizer``: BERT WordPiece from a bare ``vocab.txt`` (M3AE used bert-base-uncased).
  Built with the ``tokenizers`` library directly, because transformers 5's
  ``BertTokenizer(vocab_file=...)`` silently ignores the file and keeps a 5-token vocabulary.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "TextTokenizer",
    "OpenClipBPE",
    "HFTokenizer",
    "WordPieceTokenizer",
    "build_tokenizer",
]


class TextTokenizer(abc.ABC):
    """Common interface: ``tokenizer(texts) -> (ids (B, S) long, pad (B, S) bool)``.

    Subclasses set ``vocab_size``, ``pad_id``, ``max_len`` (and ``bos_id``/``eos_id`` where the
    back end adds them) and implement ``encode_batch`` (ids already truncated to ``max_len``, special
    tokens included, no padding) and ``_decode``. Padding and the mask are made here, once, so every
    back end gets the same mask semantics.
    """

    vocab_size: int
    pad_id: int
    max_len: int
    bos_id: int | None = None
    eos_id: int | None = None

    def __call__(self, texts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a batch. texts: B strings (a lone ``str`` is a batch of one, not B characters).

        Returns ``ids`` (B, S) int64 padded with ``pad_id`` and ``pad`` (B, S) bool, True at padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{type(self).__name__}: text {i} is {type(t).__name__}, expected str")
        ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        pad = torch.ones(len(texts), self.max_len, dtype=torch.bool)
        if not texts:
            return ids, pad
        for i, row in enumerate(self.encode_batch(texts)):
            n = len(row)
            if n > self.max_len:  # a back end that ignored truncation would silently shift the mask
                raise RuntimeError(f"{type(self).__name__} returned {n} ids > max_len={self.max_len}")
            ids[i, :n] = torch.as_tensor(row, dtype=torch.long)
            pad[i, :n] = False
        return ids, pad

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """B texts -> B id lists, each truncated to ``max_len`` with its special tokens, unpadded."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Ids with padding already removed -> text without special tokens."""

    def decode(self, ids: torch.Tensor | Sequence[int], pad_mask: torch.Tensor | Sequence[bool] | None = None
               ) -> str:
        """One sequence ``ids`` (S,) -> text, for visualisation.

        With ``pad_mask`` (S,) the padded positions are dropped exactly; without it, everything from
        the first end token on (or, for back ends without one, every ``pad_id``) is dropped.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if pad_mask is not None:
            if isinstance(pad_mask, torch.Tensor):
                pad_mask = pad_mask.reshape(-1).tolist()
            if len(pad_mask) != len(ids):
                raise ValueError(f"decode: {len(ids)} ids but {len(pad_mask)} mask entries")
            ids = [i for i, p in zip(ids, pad_mask) if not p]
        elif self.eos_id is not None and self.eos_id in ids[1:]:
            ids = ids[: ids.index(self.eos_id, 1) + 1]
        elif self.eos_id is None:
            ids = [i for i in ids if i != self.pad_id]
        return self._decode(ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, max_len={self.max_len}, "
                f"pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id})")


def _check_max_len(max_len: int, minimum: int) -> int:
    if not isinstance(max_len, int) or max_len < minimum:
        raise ValueError(f"max_len must be an int >= {minimum} (room for the special tokens), got {max_len!r}")
    return max_len


class OpenClipBPE(TextTokenizer):
    """open_clip's CLIP BPE: ``<start_of_text> tokens <end_of_text>`` then padding with id 0.

    Vocabulary 49408 (ids 49406 / 49407 are start / end of text). Text is lower-cased and
    whitespace-cleaned as in CLIP. Over-long texts are cut so the end token stays last, like
    ``open_clip.tokenize``.
    """

    def __init__(self, max_len: int = 77) -> None:
        # Imported here: importing open_clip pulls in its model zoo (~2 s), which a run using
        # another tokenizer should not pay.
        from open_clip.tokenizer import SimpleTokenizer

        self.max_len = _check_max_len(max_len, 2)
        self._bpe = SimpleTokenizer(context_length=max_len)
        self.vocab_size = len(self._bpe.encoder)
        self.bos_id = int(self._bpe.sot_token_id)
        self.eos_id = int(self._bpe.eot_token_id)
        # open_clip pads with 0; it is also a real token ("!"), which is why the mask is explicit.
        self.pad_id = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        room = self.max_len - 2
        return [[self.bos_id, *self._bpe.encode(t)[:room], self.eos_id] for t in texts]

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        return self._bpe.decode(ids).strip()


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer saved in a local directory (``save_pretrained`` output).

    Uses the tokenizer's own special tokens (e.g. [CLS] ... [SEP] for BERT, <s> ... </s> for
    RoBERTa). Padding is done here, so a tokenizer without a pad token (GPT-2) still works: it pads
    with its eos id (or 0) and the explicit mask marks those positions.

    ``add_special_tokens=False`` reproduces M3AE's text input (bert-base-uncased, no [CLS]/[SEP]).
    """

    def __init__(self, path: str | os.PathLike[str], max_len: int = 64, *, add_special_tokens: bool = True
                 ) -> None:
        from transformers import AutoTokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HFTokenizer: {path!r} is not a directory holding a saved tokenizer")
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises several types; the path is what the user needs
            raise ValueError(
                f"HFTokenizer: could not load a tokenizer from {path!r} (needs tokenizer.json, or "
                f"tokenizer_config.json beside the vocabulary files; for a bare BERT vocab.txt pass "
                f"the file itself to get WordPieceTokenizer): {e}"
            ) from e
        self.add_special_tokens = add_special_tokens
        self.max_len = _check_max_len(max_len, self._tok.num_special_tokens_to_add() + 1
                                      if add_special_tokens else 1)
        # len() counts added tokens too; .vocab_size does not, and an embedding sized by it could
        # be indexed out of range.
        self.vocab_size = len(self._tok)
        tok = self._tok
        if add_special_tokens:
            probe = tok("a", add_special_tokens=True)["input_ids"]
            self.bos_id = probe[0] if probe and probe[0] in tok.all_special_ids else None
            self.eos_id = probe[-1] if probe and probe[-1] in tok.all_special_ids else None
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
            logger.info("HFTokenizer %s has no pad token; padding with id %d (masked)", path, pad)
        self.pad_id = int(pad)
        self.path = path

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self._tok(texts, add_special_tokens=self.add_special_tokens, truncation=True,
                        max_length=self.max_len, padding=False, return_attention_mask=False,
                        return_token_type_ids=False)
        return [list(r) for r in out["input_ids"]]

    def _decode(self, ids: list[int]) -> str:
        # Drop only the framing tokens: [UNK] and [MASK] are worth seeing in a visualisation.
        tok = self._tok
        drop = {self.pad_id, self.bos_id, self.eos_id, tok.cls_token_id, tok.sep_token_id,
                tok.bos_token_id, tok.eos_token_id} - {None}
        return tok.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab_txt(vocab_file: str | os.PathLike[str]) -> dict[str, int]:
    """BERT ``vocab.txt`` -> {token: line number} (0-based), the id convention of every BERT vocab."""
    with open(vocab_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\r")
        if not token:
            continue  # keep the numbering: later tokens still get their own line number
        if token in vocab:
            logger.warning("%s: token %r on lines %d and %d; keeping the later id as BERT does",
                           vocab_file, token, vocab[token], i)
        vocab[token] = i
    return vocab


class WordPieceTokenizer(TextTokenizer):
    """BERT WordPiece from a local ``vocab.txt``: ``[CLS] pieces [SEP]`` then ``[PAD]``.

    Token ids are line numbers of ``vocab_file``. ``lowercase=True`` is bert-base-uncased
    (lower-case and strip accents); ``False`` is a cased vocabulary. CJK characters are split
    into single characters as in BERT; anything not in the vocabulary becomes [UNK].
    ``add_special_tokens=False`` reproduces M3AE's text input (no [CLS]/[SEP]).
    """

    def __init__(self, vocab_file: str | os.PathLike[str], max_len: int = 64, lowercase: bool = True, *,
                 add_special_tokens: bool = True) -> None:
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"WordPieceTokenizer: no vocab file {vocab_file!r}")
        vocab = read_vocab_txt(vocab_file)
        missing = [t for t in _BERT_SPECIALS[:4] if t not in vocab]
        if missing:
            raise ValueError(f"WordPieceTokenizer: {vocab_file!r} lacks the special tokens {missing}")
        self.add_special_tokens = add_special_tokens
        self.max_len = _check_max_len(max_len, 3 if add_special_tokens else 1)
        self.vocab_size = max(vocab.values()) + 1  # ids are line numbers, so blank lines still count
        self.pad_id = vocab["[PAD]"]
        if add_special_tokens:
            self.bos_id, self.eos_id = vocab["[CLS]"], vocab["[SEP]"]
        self.vocab_file = vocab_file

        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, as in BERT's own BasicTokenizer.
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # Registering the specials (already in the vocab, so ids are unchanged) keeps "[SEP]" typed
        # in a caption from being split into pieces and lets decode skip them.
        tok.add_special_tokens([t for t in _BERT_SPECIALS if t in vocab])
        if add_special_tokens:
            tok.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", special_tokens=[("[CLS]", self.bos_id), ("[SEP]", self.eos_id)])
        # Truncation in the tokenizer counts the [CLS]/[SEP] it adds, so [SEP] survives a cut.
        tok.enable_truncation(max_length=self.max_len)
        tok.no_padding()
        self._tok = tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=self.add_special_tokens)]

    def _decode(self, ids: list[int]) -> str:
        # Drop only the framing tokens: [UNK] and [MASK] are worth seeing in a visualisation.
        drop = {self.pad_id, self._tok.token_to_id("[CLS]"), self._tok.token_to_id("[SEP]")}
        return self._tok.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def build_tokenizer(name: str, max_len: int) -> TextTokenizer:
    """Tokenizer from a config string.

    - ``"openclip"`` (also ``"clip"``, ``"open_clip"``, ``""``): ``OpenClipBPE``;
    - a directory: ``HFTokenizer`` (a ``save_pretrained`` output);
    - a ``.txt`` file: ``WordPieceTokenizer`` (a BERT vocab.txt, lower-cased).
    """
    key = (name or "").strip()
    if key.lower() in ("", "openclip", "open_clip", "clip"):
        return OpenClipBPE(max_len)
    path = os.path.expanduser(key)
    if os.path.isdir(path):
        return HFTokenizer(path, max_len)
    if os.path.isfile(path) and path.lower().endswith(".txt"):
        return WordPieceTokenizer(path, max_len)
    raise ValueError(
        f"unknown tokenizer {name!r}: expected 'openclip', a directory holding a saved Hugging Face "
        f"tokenizer, or a path to a BERT WordPiece vocab.txt (hub names such as 'bert-base-uncased' "
        f"cannot be downloaded here: save the tokenizer to a directory and pass that path)"
    )
