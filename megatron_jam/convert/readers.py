"""Parents as streams of canonical parts: Hugging Face folders and megatron-jam checkpoints.

Why parts: a 7B parent is 14-28 GB; a merge that loads both parents whole and
then builds the output holds three models at once. A reader hands out one
part at a time ('embedding', layer N, 'final') as a canonical Megatron dict
(see `common`), reading only that part's tensors from disk: safetensors via
plain file reads (`read_safetensors`; no unpickling). megatron-jam checkpoints are
read through Megatron-Core's `dist_checkpointing` (also no unpickling of
tensors), one part's tensors at a time.
"""

import json
import os
import struct

import torch
from torch import Tensor

from megatron_jam.convert import hf_chameleon, hf_emu3, hf_gemma, hf_llama, hf_opt
from megatron_jam.convert.common import EMB, HF_EXTRA, OUT, ConvertError, RowTable
from megatron_jam.convert.vq import IMAGE_TOKENIZER_DIR, ImageTokenizerSource, read_image_tokenizer
from megatron_jam.models.config import ParentConfig

FAMILIES = {"llama": hf_llama, "opt": hf_opt, "emu3": hf_emu3, "chameleon": hf_chameleon, "gemma": hf_gemma}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class HFParent:
    """A Hugging Face `LlamaForCausalLM` / `OPTForCausalLM` / `Emu3ForConditionalGeneration` /
    `ChameleonForConditionalGeneration` folder:
    config.json + *.safetensors."""

    def __init__(self, path: str):
        self.path = path
        self.config_file = cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ConvertError(f"{path}: no config.json (expected a Hugging Face model folder)")
        with open(cfg_path) as f:
            self.hf_config = json.load(f)
        kind = self.hf_config.get("model_type")
        if kind not in FAMILIES:
            raise ConvertError(f"{cfg_path}: model_type={kind!r} is not one of {sorted(FAMILIES)}")
        self.module = FAMILIES[kind]
        self.cfg, self.vocab_size, self.tied = self.module.parent_config(self.hf_config, where=cfg_path)
        self._files = _index_safetensors(path)
        pick = getattr(self.module, "family_for", None)  # families with more than one key layout
        self.family = pick(self._files, path, self.hf_config) if pick else self.module.FAMILY

    @property
    def source(self) -> str:
        return f"hf:{self.family.name}:{self.path}"

    @property
    def hf_family(self) -> str:
        return self.hf_config["model_type"]

    def image_tokenizer(self) -> ImageTokenizerSource | None:
        """The VQ model stored with the language model (Emu3's `vqmodel.*`), or None."""
        find = getattr(self.module, "image_tokenizer", None)
        return find(self.hf_config, self._files, self.path) if find else None

    def read(self, part) -> dict[str, Tensor]:
        """One part as canonical Megatron tensors (plus `hf_extra.*` where HF has more). The vocabulary
        tables come as `Rows` (read when sliced): converters take them row-wise (`VocabPlan.fuse`)."""
        keys = self.family.hf_keys(part, self.cfg, self.tied)
        tables = {hk for names in self.family.top_map(self.cfg, self.tied).values()
                  for hk, mk in names.items() if mk in (EMB, OUT)}
        missing = [k for k in keys if k not in self._files]
        if missing:
            raise ConvertError(f"{self.path}: tensor {missing[0]} is missing from the safetensors files "
                               f"(needed by {self.family.name}, part {part!r})")
        hf = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._files[k], []).append(k)
        for fname, names in by_file.items():
            hf |= read_safetensors(os.path.join(self.path, fname), names, lazy=tables)
        return self.family.to_megatron(hf, self.cfg, self.vocab_size, self.tied, where=self.path)

    def output_rows(self) -> Tensor:
        """The output embedding [V, d] (the input embedding when tied)."""
        return self.read("embedding")[EMB] if self.tied else self.read("final")[OUT]

    def tokenizer_identity(self) -> str:
        """'sentencepiece:sha256:<16 hex>' or 'huggingface:...' (as VocabLayout.text_tokenizer) of the folder's
        tokenizer, or ''."""
        return tokenizer_identity(self.path)

    def nbytes_on_disk(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in set(self._files.values()))


class MegatronParent:
    """A megatron-jam single-stack checkpoint (model_config.json with model_type 'gpt'), read one part
    at a time: the parent model is built on the meta device for its keys and shard layout, and
    `dist_checkpointing` loads only the part's tensors."""

    def __init__(self, path: str):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        from megatron_jam.convert.checkpoint import CONVERSION_FILE, build_meta, read_hf_extra
        from megatron_jam.models.kinds import kind_of, load_model_config
        from megatron_jam.checkpointing import resolve_checkpoint_dir

        self.path = path
        cfg = load_model_config(path)
        if not kind_of(cfg).single_stack:
            raise ConvertError(f"{path}: a {kind_of(cfg).describe(cfg)} checkpoint cannot be a parent (model_type "
                               f"must be 'gpt', a single stack)")
        self.model_cfg = cfg
        self.cfg: ParentConfig = cfg.parent
        self.vocab_size, self.tied = cfg.vocab_size, cfg.share_embeddings_and_output_weights
        self._dir, _ = resolve_checkpoint_dir(path)
        self._sharded = {k: v for k, v in build_meta(cfg).sharded_state_dict().items()
                         if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        self.extra = read_hf_extra(path)
        record = os.path.join(path, CONVERSION_FILE)
        self.config_file = record if os.path.exists(record) else os.path.join(path, "model_config.json")
        self.hf_config, self.recorded_tokenizer = {}, ""
        if os.path.exists(record):
            with open(record) as f:
                data = json.load(f)
            self.hf_config = data.get("hf_config") or {}
            self.recorded_tokenizer = data.get("text_tokenizer") or ""
        self.hf_family = self.hf_config.get("model_type", self.cfg.family)

    @property
    def source(self) -> str:
        return f"megatron-jam:{self.path}"

    def image_tokenizer(self) -> ImageTokenizerSource | None:
        """The image-tokenizer folder an earlier conversion extracted, or None."""
        return read_image_tokenizer(os.path.join(self.path, IMAGE_TOKENIZER_DIR))

    def _load(self, keys: list[str]) -> dict[str, Tensor]:
        from megatron_jam.convert.streaming import load_parts

        return load_parts(self._sharded, keys, self._dir) if keys else {}

    def read(self, part) -> dict[str, Tensor]:
        """One part's tensors; the vocabulary tables as `CheckpointRows` (loaded a row slice at a time)."""
        from megatron_jam.convert.common import part_of

        keys = [k for k in self._sharded if part_of(k) == part]
        out = self._load([k for k in keys if k not in (EMB, OUT)])
        out |= {k: self._rows(k) for k in keys if k in (EMB, OUT)}
        if part == "embedding":
            out |= {k: t for k, t in self.extra.items() if k.startswith(HF_EXTRA)}
        return out

    def output_rows(self):
        return self._rows(EMB if self.tied else OUT)

    def _rows(self, key: str):
        from megatron_jam.convert.streaming import CheckpointRows

        return CheckpointRows(self._sharded[key], self._dir, self.vocab_size)

    def tokenizer_identity(self) -> str:
        """A tokenizer file's in the folder, else the one its import recorded (conversion.json `text_tokenizer`),
        so a parent imported first is still checked against the other parent's tokenizer."""
        return tokenizer_identity(self.path) or self.recorded_tokenizer

    def nbytes_on_disk(self) -> int:
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(self.path) for f in fs)


def open_parent(path: str) -> HFParent | MegatronParent:
    """A reader for `path`: megatron-jam checkpoint if it has model_config.json, else a HF folder."""
    from megatron_jam.models.kinds import MODEL_CONFIG_FILE

    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such folder")
    if os.path.exists(os.path.join(path, MODEL_CONFIG_FILE)):
        return MegatronParent(path)
    return HFParent(path)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str, names: list[str], lazy: set[str] = frozenset()) -> dict:
    """Named tensors of one .safetensors file, read into fresh tensors with plain file reads (names in
    `lazy` come back as `Rows`, read when sliced).

    Why not `safe_open`: it memory-maps the file, and mapped pages a tensor is copied from count
    in the process's resident memory until the file is closed, doubling a part's footprint."""
    header, n = read_safetensors_header(path)
    out = {}
    for name in names:
        rows = Rows(path, name, header.get(name), 8 + n)
        out[name] = rows if name in lazy else rows[:]
    return out


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header, header length) of a .safetensors file, checked against the file's size: a truncated or
    overwritten file is a `ConvertError` naming it, before any tensor is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ConvertError(f"{path}: not a safetensors file or truncated ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: unreadable safetensors header ({e})") from None
    ends = [m["data_offsets"][1] for k, m in header.items() if isinstance(m, dict) and "data_offsets" in m]
    if 8 + n + max(ends, default=0) > size:
        raise ConvertError(f"{path}: the file is truncated ({size} bytes; its header needs {8 + n + max(ends)})")
    return header, n


class Rows(RowTable):
    """A `[rows, ...]` tensor in a safetensors file; `rows[i:j]` reads just those rows from disk."""

    def __init__(self, path: str, name: str, meta: dict | None, data_start: int):
        if meta is None:
            raise ConvertError(f"{path}: tensor {name} is not in this file")
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {meta['dtype']}, which the converter does not read")
        self.path, self.name = path, name
        self.dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        self.shape = torch.Size(meta["shape"])
        start, end = meta["data_offsets"]
        self.offset = data_start + start
        nbytes = self.shape.numel() * self.dtype.itemsize
        if end - start != nbytes:
            raise ConvertError(f"{path}: tensor {name} has {end - start} bytes for shape {meta['shape']} "
                               f"{meta['dtype']} ({nbytes} expected)")

    def _read_into(self, out: Tensor, first_row: int) -> None:
        row = self.shape[1:].numel() * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset + first_row * row)
            if f.readinto(out.reshape(-1).view(torch.uint8).numpy()) != out.nbytes:
                raise ConvertError(f"{self.path}: tensor {self.name} is truncated")


def tokenizer_file(path: str) -> str:
    """The folder's first tokenizer file (`tokenizer.model`, else `tokenizer.json`), else the one a megatron-jam
    run or checkpoint carries in `tokenizer/` (megatron_jam.data.run_files), or ''."""
    from megatron_jam.data.run_files import TOKENIZER_DIR

    for folder in (path, os.path.join(path, TOKENIZER_DIR)):
        found = next((os.path.join(folder, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(folder, n))), "")
        if found:
            return found
    return ""


def tokenizer_identity(path: str) -> str:
    """The identity `megatron_jam.data.text_tokenizer` gives the folder's first tokenizer file, or ''."""
    from megatron_jam.data.text_tokenizer import file_identity

    f = tokenizer_file(path)
    return file_identity([f], "sentencepiece" if f.endswith(".model") else "huggingface") if f else ""


def _index_safetensors(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file name (from model.safetensors.index.json, or by listing)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {bins}: pickle files are never loaded; re-save with safetensors)" if bins else ""
        raise ConvertError(f"{path}: no *.safetensors files{hint}")
    out = {}
    for fname in files:
        header, _ = read_safetensors_header(os.path.join(path, fname))
        out |= {k: fname for k in header if k != "__metadata__"}
    return out
