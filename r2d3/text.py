"""An offline text encoder: a word tokenizer with hashed out-of-vocabulary buckets and a small
transformer trained jointly with the embedded model.

Why not a pretrained sentence encoder: the embedded default must run with no hub access, and its
prompts come from a small closed grammar; a learned vocabulary is exact for that grammar and still
accepts any string (unknown words map to hash buckets, so they get a stable, if untrained, token).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Sequence

import tokenizers
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

PAD, BOS = 0, 1
_NUM_SPECIAL = 2
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``tokens`` ``[B, L, D]`` and ``mask`` ``[B, L]`` (True on real tokens)."""

    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> "PromptEmbeds":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return PromptEmbeds(self.tokens[index], self.mask[index])

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens.to(*args, **kwargs), self.mask.to(kwargs.get("device", self.mask.device)))

    def detach(self) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens.detach(), self.mask)

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        length = max(e.tokens.shape[1] for e in items)
        tokens = [nn.functional.pad(e.tokens, (0, 0, 0, length - e.tokens.shape[1])) for e in items]
        masks = [nn.functional.pad(e.mask, (0, length - e.mask.shape[1])) for e in items]
        return PromptEmbeds(torch.cat(tokens), torch.cat(masks))


class WordTokenizer:
    """Lower-cased word tokenizer: known words get their own id, unknown ones one of ``num_hash_buckets``
    ids chosen by a stable hash (crc32), so every string encodes and the same word always maps alike."""

    def __init__(self, vocab: Sequence[str], num_hash_buckets: int = 64, max_length: int = 16):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + one word), got {max_length}")
        self.vocab = list(dict.fromkeys(w.lower() for w in vocab))
        self.num_hash_buckets = num_hash_buckets
        self.max_length = max_length
        self._ids = {w: i + _NUM_SPECIAL for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return _NUM_SPECIAL + len(self.vocab) + self.num_hash_buckets

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def token_id(self, word: str) -> int:
        if word in self._ids:
            return self._ids[word]
        bucket = zlib.crc32(word.encode("utf-8")) % self.num_hash_buckets
        return _NUM_SPECIAL + len(self.vocab) + bucket

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` (BOS first, padded with PAD) and mask ``[B, L]``; truncates with a warning."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        rows = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
            ids = [BOS] + [self.token_id(w) for w in self.words(prompt)]
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt has {len(ids) - 1} words, truncated to {self.max_length - 1}: {prompt[:80]!r}",
                    stacklevel=2,
                )
                ids = ids[: self.max_length]
            rows.append(ids)
        length = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD


def hf_word_tokenizer(vocab: Sequence[str], *, bos: str | None = None, eos: str | None = None,
                      lowercase: bool = True, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level Hugging Face fast tokenizer built offline: the stand-in for CLIP's, T5's and BERT's
    tokenizers in the tiny models the tests and smoke runs build (no hub access here).

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, then ``bos`` and ``eos`` (added around every prompt, as the real
    tokenizers do), then ``vocab``; with ``lowercase`` both the vocabulary and the input are lowercased."""
    specials = [t for t in (bos, eos) if t is not None]
    words = ["[PAD]", "[UNK]", *specials, *((w.lower() if lowercase else w) for w in vocab)]
    ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = tokenizers.Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    if specials:
        single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
        tok.post_processor = TemplateProcessing(single=single, special_tokens=[(t, ids[t]) for t in specials])
    optional = {"bos_token": bos, "eos_token": eos, "model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   **{k: v for k, v in optional.items() if v is not None})


class TextEncoder(ModelMixin, ConfigMixin):
    """Token embeddings plus a small transformer encoder; returns per-token features for cross-attention."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab: tuple[str, ...] = (),
        num_hash_buckets: int = 64,
        max_length: int = 16,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        self.tokenizer = WordTokenizer(vocab, num_hash_buckets, max_length)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, dim, padding_idx=PAD)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, prompts: Sequence[str]) -> PromptEmbeds:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return PromptEmbeds(self.norm(h) * mask[..., None], mask)


def module_fingerprint(module: nn.Module) -> str:
    """A sha256 prefix of a module's config and weights: config entries (without diffusers' private
    ``_*`` keys such as the load path, so the same weights loaded from two directories agree) and every
    state-dict tensor's name, dtype, shape and bytes. Tells the text encoders of cached prompt embeddings
    apart (:func:`r2d3.data.embeddings.encoder_fingerprint`)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers
        public = {k: v for k, v in items.items() if not str(k).startswith("_")}
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]
