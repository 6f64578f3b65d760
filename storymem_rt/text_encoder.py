"""UMT5-XXL text encoder (encoder only) loaded from Wan's `models_t5_umt5-xxl-enc-bf16.pth`.

The network is transformers' `UMT5EncoderModel`; the Wan checkpoint's keys are renamed through
`_KEY_TEMPLATES` and loaded strictly onto a model built on the meta device. The tokenizer is
transformers' `AutoTokenizer` from the checkpoint's `google/umt5-xxl/` folder, fed text cleaned
the way Wan's `HuggingfaceTokenizer(clean='whitespace')` cleans it.

Numerics against Wan2.2 `wan/modules/t5.py` (checked line by line, pinned by the golden test):
- no 1/sqrt(d) scaling of q.k (transformers sets `scaling = 1.0`);
- one relative-position table per layer (`shared_pos=False`; UMT5 gives every layer its own
  `relative_attention_bias`), bidirectional buckets, `max_distance` 128, same bucket formula and
  the same float -> int64 truncation order;
- gated FFN `fc2(fc1(x) * gelu_tanh(gate(x)))` (`gelu_new` is the same tanh formula);
- RMSNorm, eps 1e-6, mean of squares in fp32, cast back to the weight dtype when half;
- key padding: Wan `masked_fill`s the bias with `finfo.min`, transformers adds `finfo.min`;
  both give exactly zero probability on padded keys.
Attention runs on transformers' *eager* path, pinned in `umt5_config`: it performs Wan's op
sequence (bf16 scores + bf16 bias, softmax accumulated in fp32 and rounded to bf16 -- torch's
half-precision softmax upcasts internally, which is what Wan's `softmax(x.float()).type_as(x)`
spells out), and a bf16 run reproduces Wan's bf16 encoder bit for bit on CPU. The SDPA path
(transformers' default) folds the bias into a float mask for fused kernels and drifts from Wan by
~6e-3 in bf16 (same distance to an fp64 truth, just not Wan's numbers); it would buy nothing here,
since attention is a small share of T5-XXL's FLOPs and we run only up to the longest real prompt.
Also: transformers marks `wo` as keep-in-fp32 (`_keep_in_fp32_modules`), but that applies only
through `from_pretrained`; Wan runs every weight in the checkpoint dtype and so do we.
"""
from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import ftfy
import torch
from torch import Tensor

from .configs import T5Config, read_json
from .errors import CheckpointError, download_hint

logger = logging.getLogger("storymem_rt.text_encoder")

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
T5_CONFIG_FILES = ("t5_config.json", "config.json")
RELATIVE_MAX_DISTANCE = 128  # t5.py T5RelativeEmbedding max_dist
LAYER_NORM_EPS = 1e-6  # t5.py T5LayerNorm eps

# Wan key -> transformers UMT5EncoderModel key(s). `{n}` is the block index. The token embedding
# feeds both `shared` and the encoder's tied `embed_tokens` (both appear in the state dict).
_KEY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "blocks.{n}.norm1.weight": ("encoder.block.{n}.layer.0.layer_norm.weight",),
    "blocks.{n}.attn.q.weight": ("encoder.block.{n}.layer.0.SelfAttention.q.weight",),
    "blocks.{n}.attn.k.weight": ("encoder.block.{n}.layer.0.SelfAttention.k.weight",),
    "blocks.{n}.attn.v.weight": ("encoder.block.{n}.layer.0.SelfAttention.v.weight",),
    "blocks.{n}.attn.o.weight": ("encoder.block.{n}.layer.0.SelfAttention.o.weight",),
    "blocks.{n}.pos_embedding.embedding.weight": (
        "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight",),
    "blocks.{n}.norm2.weight": ("encoder.block.{n}.layer.1.layer_norm.weight",),
    "blocks.{n}.ffn.gate.0.weight": ("encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight",),
    "blocks.{n}.ffn.fc1.weight": ("encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight",),
    "blocks.{n}.ffn.fc2.weight": ("encoder.block.{n}.layer.1.DenseReluDense.wo.weight",),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def map_wan_t5_key(key: str) -> tuple[str, ...]:
    """Target UMT5 names of one Wan T5 key; raises KeyError for a key the table does not know."""
    m = _BLOCK_KEY.match(key)
    if m is None:
        return _KEY_TEMPLATES[key]
    n, rest = m.groups()
    return tuple(t.format(n=n) for t in _KEY_TEMPLATES["blocks.{n}." + rest])


def convert_wan_t5_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Wan T5 encoder state dict to transformers' UMT5EncoderModel names."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        try:
            targets = map_wan_t5_key(key)
        except KeyError:
            unknown.append(key)
            continue
        for t in targets:
            out[t] = value
    if unknown:
        raise CheckpointError(
            f"the T5 checkpoint has {len(unknown)} keys that are not part of Wan's UMT5 encoder "
            f"(first: {unknown[:3]}); is this really {T5_CHECKPOINT}?")
    return out


def umt5_config(cfg: T5Config):
    """transformers `UMT5Config` equal to Wan's `umt5_xxl(encoder_only=True)` with `cfg`'s sizes."""
    from transformers import UMT5Config

    if cfg.shared_pos:
        raise CheckpointError("T5 config has shared_pos=True; Wan's UMT5 encoder has one relative "
                              "position table per layer (shared_pos=False)")
    if cfg.dim_attn % cfg.num_heads:
        raise CheckpointError(f"T5 dim_attn {cfg.dim_attn} is not divisible by num_heads {cfg.num_heads}")
    return UMT5Config(
        vocab_size=cfg.vocab,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=RELATIVE_MAX_DISTANCE,
        dropout_rate=0.0,  # inference: Wan's dropout layers are identities in eval()
        layer_norm_epsilon=LAYER_NORM_EPS,
        feed_forward_proj="gated-gelu",  # -> gelu_new, Wan's tanh GELU
        is_encoder_decoder=False,
        use_cache=False,
        attn_implementation="eager",  # reproduces Wan bit for bit in bf16; see module docstring
    )


# ---------------------------------------------------------------------------------------------
# Text cleaning (Wan `tokenizers.py`, clean='whitespace')
# ---------------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """ftfy.fix_text, html.unescape twice, strip; then collapse whitespace runs to one space.

    Wan matches `\\s` with the `regex` module; stdlib `re` also matches U+001C..U+001F, but
    ftfy has already removed those control characters, so both agree on ftfy's output.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _load_torch_state(path: Path) -> dict[str, Tensor]:
    # mmap keeps the 11 GB bf16 file out of RAM until tensors are copied to the device.
    from .checkpoint import read_torch_pth

    return read_torch_pth(path, kind="t2v")


def resolve_paths(folder_or_pth: str | Path, tokenizer_dir: str | Path | None) -> tuple[Path, Path]:
    """(T5 checkpoint, tokenizer folder) of a checkpoint folder or file; CheckpointError if either is missing."""
    p = Path(folder_or_pth)
    pth = p / T5_CHECKPOINT if p.is_dir() else p
    hint = download_hint("t2v", str(pth.parent))
    if not pth.is_file():
        raise CheckpointError(f"T5 checkpoint {pth} is missing; {hint}")
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else pth.parent / T5_TOKENIZER_DIR
    if not tok.is_dir() or not any((tok / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"T5 tokenizer folder {tok} is missing or has no tokenizer.json; {hint}")
    return pth, tok


def _read_config(pth: Path) -> T5Config:
    """`t5_config.json` next to the .pth, else a T5-shaped `config.json`, else UMT5-XXL.

    A `config.json` is only taken when it has a `vocab` key: in Wan2.1-style folders the
    top-level `config.json` describes the DiT (`dim`, `num_heads`, ...), not the text encoder.
    """
    for name in T5_CONFIG_FILES:
        f = pth.parent / name
        if not f.is_file():
            continue
        raw = read_json(f, name)
        if "vocab" in raw:
            try:
                return T5Config.from_json(f)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{f}: {e}") from None
    return T5Config()


class TextEncoder:
    """Wan's UMT5 text encoder: prompts -> per-prompt states `[L_i, dim]` for the L_i real tokens."""

    def __init__(self, model, tokenizer, config: T5Config, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_checkpoint(
        cls,
        folder_or_pth: str | Path,
        tokenizer_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> "TextEncoder":
        """Load `models_t5_umt5-xxl-enc-bf16.pth` (a checkpoint folder or the file itself).

        `tokenizer_dir` defaults to `<folder>/google/umt5-xxl`. `dtype` is the compute dtype
        (Wan runs the encoder in bf16).
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        pth, tok_dir = resolve_paths(folder_or_pth, tokenizer_dir)
        cfg = _read_config(pth)
        device = torch.device(device)

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        if len(tokenizer) > cfg.vocab:
            raise CheckpointError(
                f"tokenizer {tok_dir} has {len(tokenizer)} tokens but the T5 embedding has {cfg.vocab} rows; "
                "the tokenizer and the checkpoint do not belong together")

        with torch.device("meta"):
            model = UMT5EncoderModel(umt5_config(cfg))
        # Cast/move before renaming so the tied embedding stays one tensor (~2 GB in bf16).
        state = {k: v.to(device=device, dtype=dtype) for k, v in _load_torch_state(pth).items()}
        state = convert_wan_t5_state_dict(state)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{pth} does not match the T5 config {cfg} ({e})") from None
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not leftover, f"tensors left on the meta device after a strict load: {leftover}"
        model.eval().requires_grad_(False)
        logger.info("loaded T5 encoder %s (%d layers, dim %d) on %s as %s",
                    pth, cfg.num_layers, cfg.dim, device, dtype)
        return cls(model, tokenizer, cfg, device, dtype)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Clean and tokenize like Wan: `ids`, `mask` `[B, text_len]` (int64, CPU), EOS appended."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.config.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode_ids(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """ids, mask `[B, L]` (mask 1 on a prefix of real tokens) -> list of `[L_i, dim]` states.

        Columns past the longest real prompt are dropped before the forward: T5 has no absolute
        positions and padded keys are masked, so real-token states do not depend on the padding
        (Wan pads to 512 and computes them anyway).
        """
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must both be [B, L], got {tuple(ids.shape)} and {tuple(mask.shape)}")
        mask_cpu = mask.detach().to("cpu", torch.long)
        lens = mask_cpu.sum(dim=1)
        prefix = torch.arange(mask_cpu.shape[1]) < lens[:, None]
        if not torch.equal(mask_cpu.bool(), prefix):
            raise ValueError("mask must be 1 on a prefix of each row (right padding), as the tokenizer returns")
        if int(lens.min()) < 1:
            raise ValueError("every prompt needs at least one real token")
        n = int(lens.max())
        ids = ids[:, :n].to(self.device)
        mask = mask_cpu[:, :n].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, n, dim]
        return [h[:l] for h, l in zip(hidden, lens.tolist())]

    def encode(self, prompts: list[str]) -> list[Tensor]:
        """Prompts -> list of `[L_i, dim]` states, L_i = real tokens of prompt i (EOS included)."""
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask)
