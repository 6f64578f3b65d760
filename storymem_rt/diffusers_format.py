"""diffusers-format Wan2.2 folders (`Wan-AI/Wan2.2-{T2V,I2V}-A14B-Diffusers`), read into our models.

Layout (what `huggingface-cli download Wan-AI/Wan2.2-I2V-A14B-Diffusers` gives):

    model_index.json
    transformer/     config.json (WanTransformer3DModel) + diffusion_pytorch_model*.safetensors: high noise
    transformer_2/   the same: the low-noise expert (diffusers' Wan2.2 pipeline runs `transformer`
                     while t >= boundary * 1000, then `transformer_2`)
    text_encoder/    config.json (UMT5Config) + model*.safetensors (transformers' UMT5EncoderModel)
    tokenizer/       the UMT5 tokenizer (AutoTokenizer)
    vae/             config.json (AutoencoderKLWan) + diffusion_pytorch_model.safetensors

The DiT keys are renamed to our (upstream Wan) names at load time through `DIT_KEY_MAP`, one
regex per parameter kind, so everything downstream (LoRA merge, engines, FP8) sees upstream
names. The map is the inverse of diffusers' `convert_wan_transformer_to_diffusers`
(`loaders/single_file_utils.py`): attention `self_attn`/`cross_attn` <-> `attn1`/`attn2` with
`q,k,v,o` <-> `to_q,to_k,to_v,to_out.0`; `ffn.0`/`ffn.2` <-> `ffn.net.0.proj`/`ffn.net.2`;
block `modulation` <-> `scale_shift_table`; head <-> `proj_out` + top-level `scale_shift_table`;
the embedders under `condition_embedder`; and the swapped norms: upstream `norm3` (the affine
cross-attention norm) is diffusers' `norm2` (the other two norms have no parameters).
The text encoder and VAE are the very classes we already run (UMT5EncoderModel,
AutoencoderKLWan), so their keys need no map: only the configs are translated.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .configs import DiTConfig, T5Config, VAEConfig
from .errors import CheckpointError

log = logging.getLogger("storymem_rt")

MODEL_INDEX = "model_index.json"
TRANSFORMER_DIRS = {"high": "transformer", "low": "transformer_2"}
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
VAE_DIR = "vae"
TRANSFORMER_CLASS = "WanTransformer3DModel"

_B = r"^blocks\.(\d+)\."
# diffusers WanTransformer3DModel key -> upstream WanModel key (first match wins; each pattern
# is anchored and names one parameter kind, so no key is renamed twice).
DIT_KEY_MAP: tuple[tuple[str, str], ...] = (
    (_B + r"attn1\.to_(q|k|v)\.(weight|bias)$", r"blocks.\1.self_attn.\2.\3"),
    (_B + r"attn1\.to_out\.0\.(weight|bias)$", r"blocks.\1.self_attn.o.\2"),
    (_B + r"attn1\.norm_(q|k)\.weight$", r"blocks.\1.self_attn.norm_\2.weight"),
    (_B + r"attn2\.to_(q|k|v)\.(weight|bias)$", r"blocks.\1.cross_attn.\2.\3"),
    (_B + r"attn2\.to_out\.0\.(weight|bias)$", r"blocks.\1.cross_attn.o.\2"),
    (_B + r"attn2\.norm_(q|k)\.weight$", r"blocks.\1.cross_attn.norm_\2.weight"),
    (_B + r"norm2\.(weight|bias)$", r"blocks.\1.norm3.\2"),
    (_B + r"ffn\.net\.0\.proj\.(weight|bias)$", r"blocks.\1.ffn.0.\2"),
    (_B + r"ffn\.net\.2\.(weight|bias)$", r"blocks.\1.ffn.2.\2"),
    (_B + r"scale_shift_table$", r"blocks.\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.(weight|bias)$", r"head.head.\1"),
    (r"^condition_embedder\.time_embedder\.linear_1\.(weight|bias)$", r"time_embedding.0.\1"),
    (r"^condition_embedder\.time_embedder\.linear_2\.(weight|bias)$", r"time_embedding.2.\1"),
    (r"^condition_embedder\.time_proj\.(weight|bias)$", r"time_projection.1.\1"),
    (r"^condition_embedder\.text_embedder\.linear_1\.(weight|bias)$", r"text_embedding.0.\1"),
    (r"^condition_embedder\.text_embedder\.linear_2\.(weight|bias)$", r"text_embedding.2.\1"),
    (r"^patch_embedding\.(weight|bias)$", r"patch_embedding.\1"),
)


# ----------------------------------------------------------------------------- detection

def is_diffusers_folder(folder: str | Path | None) -> bool:
    """A whole diffusers pipeline folder: `model_index.json`, or `transformer/` beside `transformer_2/`."""
    if folder is None:
        return False
    d = Path(folder)
    return (d / MODEL_INDEX).is_file() or all((d / t).is_dir() for t in TRANSFORMER_DIRS.values())


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def is_diffusers_transformer_config(raw: dict) -> bool:
    """An expert's config.json in diffusers' layout (not upstream's `dim`/`num_heads`)."""
    return raw.get("_class_name") == TRANSFORMER_CLASS or "num_attention_heads" in raw


# ----------------------------------------------------------------------------- the DiT

def dit_config(raw: dict, path: str | Path = "config.json") -> DiTConfig:
    """Our DiTConfig from a `WanTransformer3DModel` config.json (Wan2.2 A14B: no image branch)."""
    path = Path(path)
    cls = raw.get("_class_name", TRANSFORMER_CLASS)
    if cls != TRANSFORMER_CLASS:
        raise CheckpointError(f"{path}: is a {cls}, not a {TRANSFORMER_CLASS}")
    if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
        raise CheckpointError(f"{path}: has a CLIP image branch (image_dim {raw.get('image_dim')}): that is Wan2.1 "
                              "I2V; Wan2.2 A14B experts have none")
    if raw.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise CheckpointError(f"{path}: qk_norm {raw['qk_norm']!r} is not Wan's (rms_norm_across_heads)")
    try:
        heads, head_dim = int(raw["num_attention_heads"]), int(raw["attention_head_dim"])
        in_dim = int(raw["in_channels"])
        return DiTConfig(
            model_type="i2v" if in_dim != int(raw.get("out_channels", 16)) else "t2v",
            dim=heads * head_dim, ffn_dim=int(raw["ffn_dim"]), freq_dim=int(raw.get("freq_dim", 256)),
            text_dim=int(raw.get("text_dim", 4096)), num_heads=heads, num_layers=int(raw["num_layers"]),
            in_dim=in_dim, out_dim=int(raw.get("out_channels", 16)),
            patch_size=tuple(raw.get("patch_size", (1, 2, 2))), qk_norm=raw.get("qk_norm", "x") is not None,
            cross_attn_norm=bool(raw.get("cross_attn_norm", True)), eps=float(raw.get("eps", 1e-6)))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]!r} is missing from the {TRANSFORMER_CLASS} config") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- text encoder

def _weight_files(folder: Path, name: str, kind: str | None) -> list[Path]:
    from .checkpoint import safetensors_files

    return safetensors_files(folder, kind, name=name)


def t5_config(raw: dict, path: Path) -> T5Config:
    """Our T5Config from transformers' UMT5Config (text_encoder/config.json), refusing what
    Wan's encoder is not (another FFN, another relative-position reach)."""
    problems = []
    if raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        problems.append(f"feed_forward_proj {raw['feed_forward_proj']!r} (Wan's is gated-gelu)")
    if raw.get("relative_attention_max_distance", 128) != 128:
        problems.append(f"relative_attention_max_distance {raw['relative_attention_max_distance']} (Wan's is 128)")
    if raw.get("layer_norm_epsilon", 1e-6) != 1e-6:
        problems.append(f"layer_norm_epsilon {raw['layer_norm_epsilon']} (Wan's is 1e-6)")
    if problems:
        raise CheckpointError(f"{path}: not Wan's UMT5 encoder: {'; '.join(problems)}")
    try:
        heads = int(raw["num_heads"])
        return T5Config(vocab=int(raw["vocab_size"]), dim=int(raw["d_model"]), dim_attn=int(raw["d_kv"]) * heads,
                        dim_ffn=int(raw["d_ff"]), num_heads=heads, num_layers=int(raw["num_layers"]),
                        num_buckets=int(raw.get("relative_attention_num_buckets", 32)))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]!r} is missing from the UMT5 config") from None


def load_text_encoder(root: str | Path, device="cpu", dtype=torch.bfloat16):
    """UMT5 from `root/text_encoder/` and the tokenizer from `root/tokenizer/`, as our TextEncoder.

    Loaded like the upstream `.pth` (storymem_rt.text_encoder): every weight in `dtype` (no
    fp32 `wo`: Wan runs all of them in the checkpoint dtype), strict, the tied token embedding
    one tensor."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .checkpoint import iter_safetensors
    from .text_encoder import TextEncoder, umt5_config

    root = Path(root)
    te, tok = root / TEXT_ENCODER_DIR, root / TOKENIZER_DIR
    cfg = t5_config(_read_json(te / "config.json"), te / "config.json")
    if not tok.is_dir() or not any((tok / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"{tok}: tokenizer folder is missing or has no tokenizer.json / spiece.model")
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    if len(tokenizer) > cfg.vocab:
        raise CheckpointError(f"tokenizer {tok} has {len(tokenizer)} tokens but the T5 embedding has {cfg.vocab} "
                              "rows; the tokenizer and the checkpoint do not belong together")
    device = torch.device(device)
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg))
    state = {k: v.to(device=device, dtype=dtype)
             for k, v in iter_safetensors(_weight_files(te, "model.safetensors", "t2v"), kind="t2v")}
    # save_pretrained stores the tied input embedding once, as `shared.weight`.
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    expected = set(model.state_dict())
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        what = f"unexpected key {extra[0]!r}" if extra else f"key {missing[0]!r} is missing"
        raise CheckpointError(f"{te}: {what}; is this the UMT5 encoder of a Wan2.2 diffusers folder?")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{te}: does not match its config.json ({str(e).splitlines()[-1].strip()})") from None
    model.eval().requires_grad_(False)
    log.info("loaded T5 encoder from %s (%d layers, dim %d)", te, cfg.num_layers, cfg.dim)
    return TextEncoder(model, tokenizer, cfg, device, dtype)


# ----------------------------------------------------------------------------- VAE

def vae_config(raw: dict, path: Path) -> VAEConfig:
    """Our VAEConfig from an AutoencoderKLWan config.json (the Wan2.1 VAE; not Wan2.2's 5B VAE)."""
    if raw.get("is_residual") or raw.get("in_channels", 3) != 3 or raw.get("patch_size") not in (None, 1):
        raise CheckpointError(f"{path}: this is the Wan2.2 TI2V-5B VAE (is_residual / patchified input); the A14B "
                              "models use the Wan2.1 VAE")
    if raw.get("decoder_base_dim") not in (None, raw.get("base_dim", 96)):
        raise CheckpointError(f"{path}: decoder_base_dim {raw['decoder_base_dim']} differs from base_dim; "
                              "not the Wan2.1 VAE")
    d = VAEConfig()
    try:
        return VAEConfig(dim=int(raw.get("base_dim", d.dim)), z_dim=int(raw.get("z_dim", d.z_dim)),
                         dim_mult=tuple(raw.get("dim_mult", d.dim_mult)),
                         num_res_blocks=int(raw.get("num_res_blocks", d.num_res_blocks)),
                         attn_scales=tuple(raw.get("attn_scales", ())),
                         temperal_downsample=tuple(raw.get("temperal_downsample", d.temperal_downsample)),
                         dropout=float(raw.get("dropout", 0.0)),
                         latent_mean=tuple(raw.get("latents_mean", d.latent_mean)),
                         latent_std=tuple(raw.get("latents_std", d.latent_std)),
                         stride=(int(raw.get("scale_factor_temporal") or 4), int(raw.get("scale_factor_spatial") or 8),
                                 int(raw.get("scale_factor_spatial") or 8)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_vae(root: str | Path, device="cpu", dtype=torch.float32):
    """The Wan2.1 VAE from `root/vae/` as our WanVAE (diffusers' own AutoencoderKLWan, strict load)."""
    from .checkpoint import iter_safetensors
    from .vae import WanVAE, build_diffusers_vae

    folder = Path(root) / VAE_DIR
    cfg = vae_config(_read_json(folder / "config.json"), folder / "config.json")
    if len(cfg.latent_mean) != cfg.z_dim or len(cfg.latent_std) != cfg.z_dim:
        raise CheckpointError(f"{folder / 'config.json'}: latents_mean/latents_std need {cfg.z_dim} entries each")
    try:
        model = build_diffusers_vae(cfg)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    state = dict(iter_safetensors(_weight_files(folder, "diffusion_pytorch_model.safetensors", "i2v"), kind="i2v"))
    expected = model.state_dict()
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if extra or missing or bad:
        what = (f"unexpected key {extra[0]!r}" if extra else f"key {missing[0]!r} is missing" if missing else
                f"key {bad[0]!r} has shape {list(state[bad[0]].shape)}, the config says {list(expected[bad[0]].shape)}")
        raise CheckpointError(f"{folder}: {what}; the weights do not match its config.json")
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return WanVAE(torch.nn.Module.to(model, device=device, dtype=dtype), cfg)


# ----------------------------------------------------------------------------- checks

def check_folder(root: Path, kind: str) -> None:
    """Fail before any weight is read if a file of a diffusers folder is missing."""
    from .checkpoint import safetensors_files

    for sub in TRANSFORMER_DIRS.values():
        d = root / sub
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d}: config.json is missing (a diffusers folder has transformer/ and "
                                  "transformer_2/ experts)")
        safetensors_files(d, kind)


def check_shared(root: Path) -> None:
    from .checkpoint import safetensors_files

    for sub, name in ((TEXT_ENCODER_DIR, "model.safetensors"), (VAE_DIR, "diffusion_pytorch_model.safetensors")):
        if not (root / sub / "config.json").is_file():
            raise CheckpointError(f"{root / sub}: config.json is missing")
        safetensors_files(root / sub, None, name=name)
    tok = root / TOKENIZER_DIR
    if not tok.is_dir() or not any((tok / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"{tok}: tokenizer folder is missing or has no tokenizer.json / spiece.model")
