"""The tiny model bundle: every checkpoint StoryMem needs, in the upstream layouts, with
deterministic random weights, small enough that a 3-shot story renders on 2 CPU cores in
about a minute. Tests and the CPU demo run on it; real users point `--models` at the
upstream downloads, which have the same layout:

    DIR/Wan2.2-T2V-A14B/{high_noise_model (2 shards + index), low_noise_model, config.json each,
                         models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/}
    DIR/Wan2.2-I2V-A14B/  (the same, I2V experts with in_dim 36)
    DIR/StoryMem/Wan2.2-MI2V-A14B/backbone_{high,low}_noise.pth  (peft LoRA state dicts)
    DIR/storymem_tiny.json  (what this bundle is and the render settings that suit it)

Tiny folders also carry `t5_config.json` and `vae_config.json` with their sizes (upstream
folders have none: there the sizes are UMT5-XXL's and the Wan2.1 VAE's).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .configs import DiTConfig, T5Config, VAEConfig, user_cache_dir

log = logging.getLogger("storymem_rt")

TINY_FORMAT = 1
TINY_META = "storymem_tiny.json"  # marks a folder as a tiny bundle (models.read_tiny_meta)
TINY_DIT = dict(dim=128, ffn_dim=256, freq_dim=32, text_dim=64, num_heads=2, num_layers=2)
TINY_T5 = T5Config(vocab=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32)
TINY_VAE = VAEConfig(dim=8)
TINY_LORA = dict(r=8, alpha=8, rslora=True)
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
# Render settings that suit the tiny bundle (a few seconds per shot on 2 CPU cores).
TINY_RENDER_DEFAULTS = dict(size=(224, 128), frame_num=17, sample_steps=8)

# A small real vocabulary for the tiny tokenizer: enough common English that story prompts
# tokenize into many distinct ids (unknown words map to <unk>).
_WORDS = """
a an the and or but of to in on at by for with from into onto over under up down out off
is are was were be been being has have had do does did will would can could may might
he she it they we you i his her its their our your him them me us this that these those
man woman boy girl child old young keeper girl friend mother father king queen knight
walks runs looks stands sits turns holds opens closes smiles laughs cries climbs falls
light dark night day morning evening dusk dawn sun moon star sky cloud rain snow wind
sea coast shore rock beach wave boat ship harbor lighthouse tower stairs door window
room house street city village forest tree river lake mountain hill road path bridge
red orange yellow green blue navy purple white black grey gray brown golden silver
coat hat dress scarf boots shirt wool leather lantern lamp rope book letter map cup
wide medium close shot camera slow fast follows pans zooms static tracking view frame
warm cold soft bright quiet loud calm rain storm fire smoke glow shadow face hand eye
one two three first last next again then while as through behind beside near far
""".split()


def _seeded(name: str, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed((int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) + seed) % (2**63))
    return g


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic per-name init: norms at 1, biases small, matrices ~ N(0, 1/fan_in)."""
    g = _seeded(name, seed)
    leaf = name.rsplit(".", 2)
    if len(shape) == 1 and ("norm" in name or name.endswith("gamma")):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if len(shape) == 1 or name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=g)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    del leaf
    return torch.randn(shape, generator=g) / max(fan_in, 1) ** 0.5


def _dit_state(cfg: DiTConfig, seed: int) -> dict[str, torch.Tensor]:
    from .dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(cfg)
    state = {}
    for k, v in model.state_dict().items():
        t = _random_tensor(k, tuple(v.shape), seed)
        if k.endswith("modulation"):
            t = 0.1 * torch.randn(tuple(v.shape), generator=_seeded(k, seed))
        state[k] = t.contiguous()
    return state


def _write_expert(folder: Path, cfg: DiTConfig, state: dict, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    upstream = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **dataclasses.asdict(cfg),
                "window_size": [-1, -1]}
    upstream["patch_size"] = list(cfg.patch_size)
    (folder / "config.json").write_text(json.dumps(upstream, indent=2))
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def t5_state_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the Wan UMT5 encoder checkpoint (t5.py T5Encoder, shared_pos False)."""
    shapes = {"token_embedding.weight": (cfg.vocab, cfg.dim), "norm.weight": (cfg.dim,)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (cfg.dim,),
            p + "attn.q.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.k.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.v.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.o.weight": (cfg.dim, cfg.dim_attn),
            p + "norm2.weight": (cfg.dim,),
            p + "ffn.gate.0.weight": (cfg.dim_ffn, cfg.dim),
            p + "ffn.fc1.weight": (cfg.dim_ffn, cfg.dim),
            p + "ffn.fc2.weight": (cfg.dim, cfg.dim_ffn),
            p + "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
        })
    return shapes


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer (whitespace split, lowercase, `</s>` appended) over a fixed word list,
    loadable with transformers' AutoTokenizer like the upstream google/umt5-xxl folder."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = ["<pad>", "</s>", "<unk>"]
    words = list(dict.fromkeys(w.lower() for w in _WORDS))
    punct = list(".,;:!?'\"()-")
    vocab = {t: i for i, t in enumerate(specials + punct + words)}
    if len(vocab) > vocab_size:
        raise ValueError(f"tiny tokenizer needs {len(vocab)} ids but the T5 vocab has {vocab_size}")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B:1 </s>:1", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 512}, indent=2))


def _write_shared(folder: Path, seed: int) -> None:
    """T5, tokenizer and VAE: identical files in both upstream model folders."""
    from .vae import wan_vae_state_shapes

    t5 = {k: _random_tensor("t5." + k, s, seed) for k, s in t5_state_shapes(TINY_T5).items()}
    torch.save(t5, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    t5cfg = {k: v for k, v in dataclasses.asdict(TINY_T5).items() if k != "text_len"}
    (folder / "t5_config.json").write_text(json.dumps(t5cfg, indent=2))
    vae = {k: _random_tensor("vae." + k, s, seed) for k, s in wan_vae_state_shapes(TINY_VAE).items()}
    torch.save(vae, folder / "Wan2.1_VAE.pth")
    vcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(TINY_VAE).items()
            if k in ("dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout")}
    (folder / "vae_config.json").write_text(json.dumps(vcfg, indent=2))
    _write_tokenizer(folder / "google" / "umt5-xxl", TINY_T5.vocab)


def _lora_state(expert_state: dict, r: int, seed: int, tag: str) -> dict[str, torch.Tensor]:
    """peft `get_peft_model_state_dict` layout: base_model.model.<module>.lora_{A,B}.weight."""
    out = {}
    for k, w in expert_state.items():
        mod = k[: -len(".weight")]
        if not k.endswith(".weight") or not any(mod.endswith(t) for t in LORA_TARGETS) or w.ndim != 2:
            continue
        a = torch.randn(r, w.shape[1], generator=_seeded(tag + mod + "A", seed)) / w.shape[1] ** 0.5
        b = 0.05 * torch.randn(w.shape[0], r, generator=_seeded(tag + mod + "B", seed)) / r ** 0.5
        out[f"base_model.model.{mod}.lora_A.weight"] = a
        out[f"base_model.model.{mod}.lora_B.weight"] = b
    return out


def _fresh_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """`out_dir`, emptied when `overwrite` (else FileExistsError if it holds anything)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True or pick another folder")
        shutil.rmtree(out_dir)
    return out_dir


def make_tiny_models(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny bundle into `out_dir` (built in a temp folder, renamed at the end)."""
    out_dir = _fresh_folder(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        for name, model_type, in_dim in (("Wan2.2-T2V-A14B", "t2v", 16), ("Wan2.2-I2V-A14B", "i2v", 36)):
            root = tmp / name
            cfg = DiTConfig(model_type=model_type, in_dim=in_dim, **TINY_DIT)
            for expert, shards in (("high_noise_model", 2), ("low_noise_model", 1)):
                state = _dit_state(cfg, seed + hash_str(name + expert))
                _write_expert(root / expert, cfg, state, shards)
                if model_type == "i2v":
                    lora_dir = tmp / "StoryMem" / "Wan2.2-MI2V-A14B"
                    lora_dir.mkdir(parents=True, exist_ok=True)
                    tag = expert.split("_")[0]
                    torch.save(_lora_state(state, TINY_LORA["r"], seed, tag), lora_dir / f"backbone_{tag}_noise.pth")
            _write_shared(root, seed)
        meta = {"format": TINY_FORMAT, "seed": seed, "dit": TINY_DIT, "lora": TINY_LORA,
                "render_defaults": {**TINY_RENDER_DEFAULTS, "size": list(TINY_RENDER_DEFAULTS["size"])}}
        (tmp / TINY_META).write_text(json.dumps(meta, indent=2))
    log.info("wrote tiny model bundle to %s", out_dir)
    return out_dir


def hash_str(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def tiny_cache_dir() -> Path:
    return user_cache_dir() / f"tiny-v{TINY_FORMAT}"


def ensure_tiny_models(seed: int = 0) -> Path:
    """The tiny bundle in the user cache, built once (deterministic, so every machine gets the same)."""
    d = tiny_cache_dir()
    if (d / TINY_META).is_file():
        return d
    return make_tiny_models(d, seed=seed, overwrite=True)


def ensure_tiny_distill(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny 4-step "distill" LoRAs for the tiny bundle at `root` (random, rank 4, Wan's original key
    format with alpha), written once into `root/distill/{t2v,i2v}` as the upstream repositories name
    their files; returns {'t2v': folder, 'm2v': folder}. Preview's machinery on the CPU, not a picture."""
    from safetensors.torch import save_file

    from .atomic import atomic_dir

    root = Path(root)
    out = {}
    for kind, name, in_dim in (("t2v", "t2v", 16), ("m2v", "i2v", 36)):
        folder = root / "distill" / name
        out[kind] = folder
        if folder.is_dir():
            continue
        cfg = DiTConfig(model_type=name, in_dim=in_dim, **TINY_DIT)
        with atomic_dir(folder) as tmp:
            for tag in ("high", "low"):
                g = torch.Generator().manual_seed(seed + hash_str(f"distill-{name}-{tag}"))
                state = {}
                for i in range(cfg.num_layers):
                    for t in LORA_TARGETS:
                        n_in = cfg.ffn_dim if t == "ffn.2" else cfg.dim
                        n_out = cfg.ffn_dim if t == "ffn.0" else cfg.dim
                        key = f"diffusion_model.blocks.{i}.{t}"
                        state[key + ".lora_down.weight"] = torch.randn(4, n_in, generator=g) / n_in ** 0.5
                        state[key + ".lora_up.weight"] = torch.randn(n_out, 4, generator=g) * 0.02
                        state[key + ".alpha"] = torch.tensor(4.0)
                file = f"wan2.2_{name}_tiny_{tag}_noise_lora_rank4_4step.safetensors"
                save_file(state, str(tmp / file), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- the diffusers layout

DIFFUSERS_PIPELINES = {"Wan2.2-T2V-A14B": ("WanPipeline", 0.875), "Wan2.2-I2V-A14B": ("WanImageToVideoPipeline", 0.9)}


def make_tiny_diffusers_models(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """The tiny bundle's very weights in diffusers' layout (`Wan2.2-{T2V,I2V}-A14B-Diffusers/`:
    `transformer/` (sharded), `transformer_2/`, `text_encoder/`, `tokenizer/`, `vae/`,
    `model_index.json`), written by diffusers' and transformers' own `save_pretrained`, the DiT
    keys converted by diffusers' own `convert_wan_transformer_to_diffusers` (not by our map, so
    tests compare two independent conversions). StoryMem's LoRA is copied as it is."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    from .checkpoint import safetensors_files
    from .text_encoder import TextEncoder
    from .vae import WanVAE

    out_dir = _fresh_folder(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        src = make_tiny_models(tmp / "upstream", seed=seed)
        for name, (pipeline, boundary) in DIFFUSERS_PIPELINES.items():
            root = tmp / f"{name}-Diffusers"
            for expert, sub, shard in (("high_noise_model", "transformer", "300KB"),
                                       ("low_noise_model", "transformer_2", "10GB")):
                cfg = DiTConfig.from_json(src / name / expert / "config.json")
                model = WanTransformer3DModel(
                    patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                    in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                    ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                    qk_norm="rms_norm_across_heads", eps=cfg.eps)
                state = {}
                for f in safetensors_files(src / name / expert):
                    state.update(load_file(str(f)))
                model.load_state_dict(convert_wan_transformer_to_diffusers(state), strict=True)
                model.save_pretrained(root / sub, max_shard_size=shard)
            te = TextEncoder.from_checkpoint(src / name, device="cpu", dtype=torch.float32)
            te.model.save_pretrained(root / "text_encoder")
            te.tokenizer.save_pretrained(root / "tokenizer")
            WanVAE.from_checkpoint(src / name, device="cpu").model.save_pretrained(root / "vae")
            index = {"_class_name": pipeline, "_diffusers_version": "0.35.0", "boundary_ratio": boundary,
                     "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                     "text_encoder": ["transformers", "UMT5EncoderModel"],
                     "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                     "transformer": ["diffusers", "WanTransformer3DModel"],
                     "transformer_2": ["diffusers", "WanTransformer3DModel"],
                     "vae": ["diffusers", "AutoencoderKLWan"]}
            (root / "model_index.json").write_text(json.dumps(index, indent=2))
        shutil.move(str(src / "StoryMem"), str(tmp / "StoryMem"))
        meta = json.loads((src / "storymem_tiny.json").read_text())
        (tmp / "storymem_tiny.json").write_text(json.dumps({**meta, "layout": "diffusers"}, indent=2))
        shutil.rmtree(src)
    log.info("wrote tiny model bundle (diffusers layout) to %s", out_dir)
    return out_dir
