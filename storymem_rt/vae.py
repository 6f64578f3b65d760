"""Wan2.1 VAE (`Wan2.1_VAE.pth`): video <-> normalised latent.

The network is diffusers' `AutoencoderKLWan`, whose chunked causal processing matches the
reference (Wan2.2 `wan/modules/vae2_1.py` `WanVAE_.encode/decode`): encode runs the first
frame alone, then chunks of 4 frames, with a per-conv feature cache; decode runs one latent
frame at a time with a cache. Weights come in the upstream layout and go through our own key
table (no diffusers conversion script); the architecture is inferred from the weight shapes
and cross-checked against `vae_config.json` / `config.json` beside the file when present.

Shapes: video `[B, 3, F, H, W]` in [-1, 1], F = 4n+1, H and W multiples of 8;
latent `[B, z_dim, (F-1)//4 + 1, H/8, W/8]` normalised as `(mu - mean) / std`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .configs import VAEConfig, read_json
from .errors import CheckpointError, download_hint

VAE_FILENAME = "Wan2.1_VAE.pth"

# Upstream residual block (`ResidualBlock.residual` is an nn.Sequential: norm, SiLU, conv,
# norm, SiLU, dropout, conv) -> diffusers `WanResidualBlock` attribute names.
_RESBLOCK_KEYS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}

# Fixed module prefixes (longest match wins; `{e}` is encoder or decoder).
_PREFIXES = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "{e}.conv1.": "{e}.conv_in.",
    "{e}.head.0.": "{e}.norm_out.",
    "{e}.head.2.": "{e}.conv_out.",
    "{e}.middle.0.": "{e}.mid_block.resnets.0.",
    "{e}.middle.1.": "{e}.mid_block.attentions.0.",
    "{e}.middle.2.": "{e}.mid_block.resnets.1.",
}
_PREFIX_TABLE = sorted(
    ((src.format(e=e), dst.format(e=e)) for src, dst in _PREFIXES.items() for e in ("encoder", "decoder")),
    key=lambda kv: -len(kv[0]),
)


# ----------------------------------------------------------------------------- layout
def _check_supported(cfg: VAEConfig) -> None:
    if cfg.attn_scales:
        # diffusers' Wan2.1 decoder has no attention in its up blocks; the Wan2.1 VAE has none.
        raise ValueError(f"attn_scales must be empty for the Wan2.1 VAE, got {cfg.attn_scales}")
    if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
        raise ValueError(
            f"temperal_downsample needs {len(cfg.dim_mult) - 1} entries for dim_mult {cfg.dim_mult}, "
            f"got {cfg.temperal_downsample}"
        )


def _resblock_shapes(prefix: str, cin: int, cout: int) -> dict[str, tuple]:
    s = {
        f"{prefix}residual.0.gamma": (cin, 1, 1, 1),
        f"{prefix}residual.2.weight": (cout, cin, 3, 3, 3),
        f"{prefix}residual.2.bias": (cout,),
        f"{prefix}residual.3.gamma": (cout, 1, 1, 1),
        f"{prefix}residual.6.weight": (cout, cout, 3, 3, 3),
        f"{prefix}residual.6.bias": (cout,),
    }
    if cin != cout:
        s[f"{prefix}shortcut.weight"] = (cout, cin, 1, 1, 1)
        s[f"{prefix}shortcut.bias"] = (cout,)
    return s


def _middle_shapes(prefix: str, c: int) -> dict[str, tuple]:
    s = _resblock_shapes(f"{prefix}middle.0.", c, c)
    s.update({
        f"{prefix}middle.1.norm.gamma": (c, 1, 1),
        f"{prefix}middle.1.to_qkv.weight": (3 * c, c, 1, 1),
        f"{prefix}middle.1.to_qkv.bias": (3 * c,),
        f"{prefix}middle.1.proj.weight": (c, c, 1, 1),
        f"{prefix}middle.1.proj.bias": (c,),
    })
    s.update(_resblock_shapes(f"{prefix}middle.2.", c, c))
    return s


def _decoder_layout(cfg: VAEConfig) -> list[tuple[int, str]]:
    """Flat `decoder.upsamples.N` index -> (stage, "resnets.j" | "upsamplers.0")."""
    out = []
    for i in range(len(cfg.dim_mult)):
        out += [(i, f"resnets.{j}") for j in range(cfg.num_res_blocks + 1)]
        if i != len(cfg.dim_mult) - 1:
            out.append((i, "upsamplers.0"))
    return out


def wan_vae_state_shapes(cfg: VAEConfig) -> dict[str, tuple]:
    """Every parameter of the upstream `WanVAE_` state dict with its shape, in upstream order
    (vae2_1.py `Encoder3d`, `conv1`, `conv2`, `Decoder3d`)."""
    _check_supported(cfg)
    z, nrb = cfg.z_dim, cfg.num_res_blocks
    s: dict[str, tuple] = {}

    # encoder: dims [dim * u for u in [1] + dim_mult], flat list of blocks and downsamples
    dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
    s["encoder.conv1.weight"] = (dims[0], 3, 3, 3, 3)
    s["encoder.conv1.bias"] = (dims[0],)
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(nrb):
            s.update(_resblock_shapes(f"encoder.downsamples.{n}.", cin, cout))
            cin, n = cout, n + 1
        if i != len(cfg.dim_mult) - 1:
            p = f"encoder.downsamples.{n}."
            s[p + "resample.1.weight"] = (cout, cout, 3, 3)
            s[p + "resample.1.bias"] = (cout,)
            if cfg.temperal_downsample[i]:
                s[p + "time_conv.weight"] = (cout, cout, 3, 1, 1)
                s[p + "time_conv.bias"] = (cout,)
            n += 1
    c = dims[-1]
    s.update(_middle_shapes("encoder.", c))
    s["encoder.head.0.gamma"] = (c, 1, 1, 1)
    s["encoder.head.2.weight"] = (2 * z, c, 3, 3, 3)
    s["encoder.head.2.bias"] = (2 * z,)

    s["conv1.weight"] = (2 * z, 2 * z, 1, 1, 1)
    s["conv1.bias"] = (2 * z,)
    s["conv2.weight"] = (z, z, 1, 1, 1)
    s["conv2.bias"] = (z,)

    # decoder: dims [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]; each upsample halves
    # the channels, so every stage after the first starts from in_dim // 2.
    dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    s["decoder.conv1.weight"] = (dims[0], z, 3, 3, 3)
    s["decoder.conv1.bias"] = (dims[0],)
    s.update(_middle_shapes("decoder.", dims[0]))
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2
        for _ in range(nrb + 1):
            s.update(_resblock_shapes(f"decoder.upsamples.{n}.", cin, cout))
            cin, n = cout, n + 1
        if i != len(cfg.dim_mult) - 1:
            p = f"decoder.upsamples.{n}."
            s[p + "resample.1.weight"] = (cout // 2, cout, 3, 3)
            s[p + "resample.1.bias"] = (cout // 2,)
            if temperal_upsample[i]:
                s[p + "time_conv.weight"] = (2 * cout, cout, 3, 1, 1)
                s[p + "time_conv.bias"] = (2 * cout,)
            n += 1
    s["decoder.head.0.gamma"] = (cout, 1, 1, 1)
    s["decoder.head.2.weight"] = (3, cout, 3, 3, 3)
    s["decoder.head.2.bias"] = (3,)
    return s


def wan_to_diffusers_key(key: str, cfg: VAEConfig) -> str:
    """Rename one upstream key to its `AutoencoderKLWan` name; KeyError if it has none."""
    for src, dst in _PREFIX_TABLE:
        if key.startswith(src):
            rest = key[len(src):]
            if ".resnets." in dst:
                rest = _RESBLOCK_KEYS[rest]
            return dst + rest
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[0] in ("encoder", "decoder") and parts[2].isdigit():
        side, block, n, rest = parts[0], parts[1], int(parts[2]), parts[3]
        if side == "encoder" and block == "downsamples":
            # diffusers keeps the encoder's flat list; only residual-block names change.
            return f"encoder.down_blocks.{n}.{_RESBLOCK_KEYS.get(rest, rest)}"
        if side == "decoder" and block == "upsamples":
            stage, sub = _decoder_layout(cfg)[n]
            if sub.startswith("resnets"):
                rest = _RESBLOCK_KEYS[rest]
            return f"decoder.up_blocks.{stage}.{sub}.{rest}"
    raise KeyError(key)


def convert_wan_vae_state_dict(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Upstream `Wan2.1_VAE.pth` state dict -> `AutoencoderKLWan` state dict (same tensors)."""
    out = {}
    for k, v in sd.items():
        try:
            out[wan_to_diffusers_key(k, cfg)] = v
        except (KeyError, IndexError):
            raise ValueError(f"unexpected VAE parameter {k!r}") from None
    return out


# ----------------------------------------------------------------------------- loading
def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {download_hint('i2v', str(path.parent))}")


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    """The one weights_only reader (storymem_rt.checkpoint), with the VAE's own missing-file line."""
    from .checkpoint import read_torch_pth

    if not path.is_file():
        raise _fail(path, "the VAE checkpoint is missing")
    return read_torch_pth(path, kind="i2v")


def infer_vae_config(sd: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> VAEConfig:
    """Read the architecture off the weight shapes, then check every key and shape against it."""
    path = Path(path)
    try:
        dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as e:
        raise _fail(path, f"is not a Wan2.1 VAE checkpoint (no {e.args[0]!r})") from None
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    if blocks != list(range(len(blocks))) or not blocks:
        raise _fail(path, "has a gap in its encoder.downsamples blocks")
    stages: list[list[int]] = [[]]
    temporal: list[bool] = []
    for n in blocks:
        p = f"encoder.downsamples.{n}."
        if p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            stages.append([])
        elif p + "residual.2.weight" in sd:
            stages[-1].append(sd[p + "residual.2.weight"].shape[0])
        else:
            raise _fail(path, f"block encoder.downsamples.{n} is neither a residual block nor a "
                              "downsample (attention in the down path is not supported)")
    nrb = len(stages[0])
    if any(len(s) != nrb or len(set(s)) != 1 for s in stages) or any(s[0] % dim for s in stages):
        raise _fail(path, f"has irregular encoder stages {stages} for base dim {dim}")
    cfg = VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(s[0] // dim for s in stages),
                    num_res_blocks=nrb, attn_scales=(), temperal_downsample=tuple(temporal),
                    stride=(2 ** sum(temporal), 2 ** len(temporal), 2 ** len(temporal)))
    if cfg.stride[0] != 4:
        # Both the reference and diffusers chunk the encoder input as 1, 4, 4, ... frames.
        raise _fail(path, f"has temporal stride {cfg.stride[0]}; the Wan2.1 VAE needs 4")

    expected = wan_vae_state_shapes(cfg)
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {s}"
                 for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise _fail(path, "does not match a Wan2.1 VAE of base dim "
                          f"{dim}: " + "; ".join(problems[:5]) + more)
    return cfg


def _sidecar_config(path: Path) -> tuple[Path, VAEConfig] | None:
    """`vae_config.json` beside the file (tiny bundles), else a `config.json` with VAE keys."""
    for name in ("vae_config.json", "config.json"):
        p = path.parent / name
        if not p.is_file():
            continue
        raw = read_json(p, name)
        if name == "config.json" and not {"z_dim", "dim_mult"} <= set(raw):
            continue  # some other model's config
        try:
            return p, VAEConfig.from_json(p)
        except TypeError as e:
            raise CheckpointError(f"{p}: {e}") from None
    return None


def _resolve_config(path: Path, sd: dict[str, torch.Tensor]) -> VAEConfig:
    cfg = infer_vae_config(sd, path)
    side = _sidecar_config(path)
    if side is not None:
        jpath, jcfg = side
        for f in ("dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample"):
            want, have = getattr(jcfg, f), getattr(cfg, f)
            if isinstance(want, (list, tuple)):
                want, have = tuple(want), tuple(have)
            if want != have:
                raise CheckpointError(f"{jpath}: says {f}={want} but {path.name} has {f}={have}; "
                                      "the config and the weights do not belong together")
        cfg = dataclasses.replace(cfg, latent_mean=tuple(jcfg.latent_mean),
                                  latent_std=tuple(jcfg.latent_std), dropout=jcfg.dropout)
    if len(cfg.latent_mean) != cfg.z_dim or len(cfg.latent_std) != cfg.z_dim:
        raise CheckpointError(f"{path}: latent_mean/latent_std need {cfg.z_dim} entries each")
    return cfg


def build_diffusers_vae(cfg: VAEConfig, device: str | torch.device = "meta"):
    """An `AutoencoderKLWan` for `cfg` (on the meta device by default: no memory, no init)."""
    from diffusers import AutoencoderKLWan  # heavy import, only when a VAE is built

    _check_supported(cfg)
    with torch.device(device):
        return AutoencoderKLWan(
            base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, attn_scales=[],
            temperal_downsample=list(cfg.temperal_downsample), dropout=cfg.dropout,
            latents_mean=list(cfg.latent_mean), latents_std=list(cfg.latent_std),
            scale_factor_temporal=cfg.stride[0], scale_factor_spatial=cfg.stride[1],
        )


# ----------------------------------------------------------------------------- model
class WanVAE:
    """Wan2.1 VAE with the reference's latent normalisation. Inputs/outputs float32 on the
    model's device; the network runs in `dtype`."""

    def __init__(self, model, cfg: VAEConfig):
        self.model = model.eval().requires_grad_(False)
        self.config = cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # vae2_1.py keeps `scale = [mean, 1 / std]` and computes (mu - mean) * (1/std) and
        # z / (1/std) + mean; we do the same float32 arithmetic so latents match to the ulp.
        shape = (1, cfg.z_dim, 1, 1, 1)
        self._mean = torch.tensor(cfg.latent_mean, dtype=torch.float32, device=self.device).view(shape)
        self._inv_std = 1.0 / torch.tensor(cfg.latent_std, dtype=torch.float32, device=self.device).view(shape)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load `Wan2.1_VAE.pth` (a file, or a folder holding one) in the upstream layout."""
        path = Path(path)
        if path.is_dir():
            path = path / VAE_FILENAME
        sd = _read_pth(path)
        cfg = _resolve_config(path, sd)
        model = build_diffusers_vae(cfg)
        try:
            model.load_state_dict(convert_wan_vae_state_dict(sd, cfg), strict=True, assign=True)
        except (ValueError, RuntimeError) as e:  # shapes were checked: a bug of ours if reached
            raise _fail(path, f"could not be loaded ({e})") from None
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules, of
        # which AutoencoderKLWan has none.
        return cls(torch.nn.Module.to(model, device=device, dtype=dtype), cfg)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression: (4, 8, 8) for Wan2.1."""
        return tuple(self.config.stride)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        st, sh, sw = self.stride
        f, h, w = video.shape[2:]
        if (f - 1) % st:
            raise ValueError(f"video needs {st}n+1 frames (the VAE's temporal stride), got {f}")
        if h % sh or w % sw:
            raise ValueError(f"video height and width must be multiples of {sh}, got {h}x{w}")

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` in [-1, 1] -> normalised latent `[B, z, (F-1)//4 + 1, H/8, W/8]`
        (float32). Deterministic: the posterior mean, as the reference uses."""
        self._check_video(video)
        x = video.to(device=self.device, dtype=self.dtype)
        mu = self.model.encode(x).latent_dist.mode().float()
        return (mu - self._mean) * self._inv_std

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent `[B, z, T, h, w]` -> video `[B, 3, 4(T-1)+1, 8h, 8w]` clamped to
        [-1, 1] (float32)."""
        if latent.ndim != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"latent must be [B, {self.config.z_dim}, T, h, w], got {tuple(latent.shape)}")
        z = latent.to(device=self.device, dtype=torch.float32) / self._inv_std + self._mean
        # diffusers' _decode clamps to [-1, 1], as the reference's Wan2_1_VAE.decode does.
        return self.model.decode(z.to(self.dtype)).sample.float().clamp_(-1.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Memory keyframes `[N, 3, H, W]` in [-1, 1] -> `[z, N, h, w]`: each image encoded as
        its own one-frame clip (the batch dimension keeps them independent), in one call."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        lat = self.encode(images.unsqueeze(2))  # [N, z, 1, h, w]
        return lat[:, :, 0].transpose(0, 1)
