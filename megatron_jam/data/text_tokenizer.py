"""Text tokenizers: a sentencepiece `.model` file or a Hugging Face `tokenizer.json`, behind one interface.

Why: the tiny default and Llama-2-style parents ship a sentencepiece model,
but the public image-generating parents (Emu3's Qwen BPE, Chameleon,
Llama-3) ship a `tokenizers` folder (`tokenizer.json`, `tokenizer_config.json`).
Preprocessing, the vocabulary layout, generation and the inspector only need
`encode`, `decode`, the vocabulary size, the end-of-sequence id and an
identity to record in `VocabLayout.text_tokenizer`; this module gives them
that for both kinds, loaded from local files only (never a hub download).

Flags follow Megatron-LM: `--tokenizer-model PATH` and `--tokenizer-type
SentencePieceTokenizer|HuggingFaceTokenizer`, the type inferred from the
path when not given (a `.model` file: sentencepiece; a `tokenizer.json` file
or a folder holding one: Hugging Face).

Encoding adds no special tokens (no BOS, no EOS) for either kind: the
document layout (`megatron_jam.data.documents`) places `<eos>` itself, and
the ids of a text then depend on `tokenizer.json` alone. That is also why the
Hugging Face identity hashes `tokenizer.json` only: `tokenizer_config.json`
changes no id (chat template, `add_bos_token`, ...), and the one thing taken
from it, the eos token, is recorded separately as the layout's `text_eos_id`.
Sentencepiece identities are unchanged ("sentencepiece:sha256:<16 hex>" of
the `.model` file), so existing layouts still match.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from typing import Iterable, List, Optional

SENTENCEPIECE, HUGGINGFACE = "SentencePieceTokenizer", "HuggingFaceTokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # where the eos token is named, in order


class TextTokenizerError(ValueError):
    """A text tokenizer cannot be loaded, or does not match a vocabulary layout; the message is one line."""


def file_identity(paths: Iterable[str], kind: str) -> str:
    """'kind:sha256:<16 hex>' of the files' bytes, in order (as `VocabLayout.text_tokenizer` records it)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"{kind}:sha256:{digest.hexdigest()[:16]}"


class TextTokenizer(abc.ABC):
    """What the tools need from a text tokenizer; ids are in [0, vocab_size)."""

    type: str
    """`SentencePieceTokenizer` or `HuggingFaceTokenizer` (the `--tokenizer-type` value)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of text ids (the layout's `text_vocab_size`)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> Optional[int]:
        """The tokenizer's end-of-sequence id, or None when it has none."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """'kind:sha256:<16 hex>' recorded in `VocabLayout.text_tokenizer`."""

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Ids of `text`, no special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens such as eos are dropped)."""

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """`encode` of each text, in this thread (the caller parallelises with processes)."""
        return [self.encode(t) for t in texts]

    def special_ids(self) -> dict:
        """{"bos_token_id", "eos_token_id", "pad_token_id"} -> id or None: what a Hugging Face export writes
        into config.json and generation_config.json."""
        return {"bos_token_id": None, "eos_token_id": self.eos_id, "pad_token_id": None}


class SentencePieceTextTokenizer(TextTokenizer):
    """A sentencepiece `.model` file (what every tool accepted before)."""

    type = SENTENCEPIECE

    def __init__(self, path: str) -> None:
        import sentencepiece

        super().__init__(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TextTokenizerError(f"--tokenizer-model {path}: not a sentencepiece model ({_first_line(e)})") from e

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> Optional[int]:
        return int(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None

    @property
    def identity(self) -> str:
        return file_identity([self.path], "sentencepiece")

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def special_ids(self) -> dict:
        ids = {"bos_token_id": self.sp.bos_id(), "eos_token_id": self.sp.eos_id(), "pad_token_id": self.sp.pad_id()}
        return {k: int(v) if v >= 0 else None for k, v in ids.items()}

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=1) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(t) for t in ids])


class HuggingFaceTextTokenizer(TextTokenizer):
    """A Hugging Face fast tokenizer: `tokenizer.json` (the file, or its folder), read with `tokenizers`."""

    type = HUGGINGFACE

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        super().__init__(path)
        self.file = os.path.join(path, HF_TOKENIZER_FILE) if os.path.isdir(path) else path
        try:
            self.tok = Tokenizer.from_file(self.file)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TextTokenizerError(f"--tokenizer-model {self.file}: not a Hugging Face tokenizer.json "
                                     f"({_first_line(e)})") from e
        vocab = self.tok.get_vocab(with_added_tokens=True)
        # ids are normally contiguous; a tokenizer with holes still needs every id below its largest
        self._size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self._eos = self._read_token(os.path.dirname(os.path.abspath(self.file)), "eos_token")

    def special_ids(self) -> dict:
        folder = os.path.dirname(os.path.abspath(self.file))
        return {f"{name}_id": self._read_token(folder, name) for name in ("bos_token", "eos_token", "pad_token")}

    def _read_token(self, folder: str, key: str) -> Optional[int]:
        """Id of the `key` token (e.g. eos_token) named in tokenizer_config.json (else special_tokens_map.json),
        or None."""
        for name in HF_CONFIG_FILES:
            config = os.path.join(folder, name)
            if not os.path.isfile(config):
                continue
            try:
                with open(config, encoding="utf-8") as f:
                    token = json.load(f).get(key)
            except (OSError, ValueError, AttributeError) as e:
                raise TextTokenizerError(f"{config}: cannot read {key} ({_first_line(e)})") from e
            if isinstance(token, dict):  # serialised AddedToken
                token = token.get("content")
            if not token:
                continue
            found = self.tok.token_to_id(token)
            if found is None:
                raise TextTokenizerError(f"{config}: {key} {token!r} is not in {self.file}")
            return int(found)
        return None

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eos_id(self) -> Optional[int]:
        return self._eos

    @property
    def identity(self) -> str:
        return file_identity([self.file], "huggingface")

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(t) for t in ids], skip_special_tokens=True)


def infer_tokenizer_type(path: str) -> str:
    """`SentencePieceTokenizer` for a `.model` file, `HuggingFaceTokenizer` for a tokenizer.json (or its folder)."""
    if os.path.isfile(path) and path.endswith(".model"):
        return SENTENCEPIECE
    if (os.path.isfile(path) and path.endswith(".json")) or os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE)):
        return HUGGINGFACE
    what = "no such file or folder" if not os.path.exists(path) else "neither a sentencepiece .model file nor a " \
        "Hugging Face tokenizer.json (or a folder holding one)"
    raise TextTokenizerError(f"--tokenizer-model {path}: {what}")


def load_text_tokenizer(path: str, tokenizer_type: Optional[str] = None) -> TextTokenizer:
    """The tokenizer at `path` (local files only); `tokenizer_type` is inferred from the path when None."""
    tokenizer_type = tokenizer_type or infer_tokenizer_type(path)
    if tokenizer_type == SENTENCEPIECE:
        if not os.path.isfile(path):
            raise TextTokenizerError(f"--tokenizer-model {path}: no such sentencepiece .model file")
        return SentencePieceTextTokenizer(path)
    if tokenizer_type == HUGGINGFACE:
        if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE))):
            raise TextTokenizerError(f"--tokenizer-model {path}: no tokenizer.json file (or folder holding one)")
        return HuggingFaceTextTokenizer(path)
    raise TextTokenizerError(f"--tokenizer-type {tokenizer_type}: expected one of {', '.join(TOKENIZER_TYPES)}")


def check_layout(tokenizer: TextTokenizer, layout) -> None:
    """The tokenizer must be the one `layout` (a `VocabLayout`) was built with: same size, same identity."""
    if tokenizer.vocab_size != layout.text_vocab_size:
        raise TextTokenizerError(f"--tokenizer-model {tokenizer.path} has {tokenizer.vocab_size} text ids but the "
                                 f"vocabulary layout has text_vocab_size={layout.text_vocab_size}")
    if layout.text_tokenizer and layout.text_tokenizer != tokenizer.identity:
        raise TextTokenizerError(f"--tokenizer-model {tokenizer.path} is {tokenizer.identity}, but the vocabulary "
                                 f"layout was built with {layout.text_tokenizer}")


def add_tokenizer_args(parser, required: bool = True, help_suffix: str = "") -> None:
    """`--tokenizer-model` and `--tokenizer-type` (Megatron-LM's names) on an argparse parser or group."""
    what = "sentencepiece .model file, or a Hugging Face tokenizer.json (or its folder)"
    parser.add_argument("--tokenizer-model", required=required, help=what + help_suffix)
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                        help="default: inferred from --tokenizer-model (.model: sentencepiece, else Hugging Face)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
