"""UMT5 text encoder: key mapping, loading, cleaning, tokenization and the reference golden.

`_wan_t5_ref` is a plain-PyTorch restatement of Wan2.2 `wan/modules/t5.py`'s encoder math (written
from the equations, not copied), used to pin bf16 behaviour and as an fp64 truth.
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from storymem_rt.configs import T5Config
from storymem_rt.errors import CheckpointError
from storymem_rt.text_encoder import (
    T5_CHECKPOINT,
    TextEncoder,
    _load_torch_state,
    _read_config,
    clean_prompt,
    convert_wan_t5_state_dict,
    map_wan_t5_key,
    umt5_config,
)

TOL = 1e-5


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_pth(golden):
    return golden / "tiny-t5" / T5_CHECKPOINT


@pytest.fixture(scope="session")
def bundle(golden):
    return golden / "pipeline" / "bundle" / "Wan2.2-T2V-A14B"


@pytest.fixture(scope="session")
def tokenizer_dir(bundle):
    return bundle / "google" / "umt5-xxl"


@pytest.fixture(scope="session")
def tiny_encoder(tiny_pth, tokenizer_dir):
    return TextEncoder.from_checkpoint(tiny_pth, tokenizer_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def t5_golden(golden):
    return load_file(str(golden / "t5-encoder.safetensors"))


def _wan_keys(num_layers: int) -> list[str]:
    per_block = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight"]
    return ["token_embedding.weight", "norm.weight"] + [f"blocks.{n}.{k}" for n in range(num_layers) for k in per_block]


# ---- Wan's encoder math, restated -------------------------------------------------------------
def _bucket(rel: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    half = num_buckets // 2  # bidirectional: half the buckets for keys after the query
    exact = half // 2
    out = (rel > 0).long() * half
    r = rel.abs()
    large = exact + (torch.log(r.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return out + torch.where(r < exact, r, large.clamp(max=half - 1))


def _wan_t5_ref(state, cfg: T5Config, ids, mask, dtype):
    w = {k: v.to(dtype) for k, v in state.items()}

    def rms(x, g):
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return g * (y.to(g.dtype) if g.dtype in (torch.float16, torch.bfloat16) else y)

    x = w["token_embedding.weight"][ids]
    b, n, _ = x.shape
    h, d = cfg.num_heads, cfg.dim_attn // cfg.num_heads
    buckets = _bucket(torch.arange(n)[None] - torch.arange(n)[:, None], cfg.num_buckets)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        y = rms(x, w[p + "norm1.weight"])
        q, k, v = (F_linear(y, w[p + f"attn.{c}.weight"]).view(b, n, h, d) for c in "qkv")
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None].repeat(b, 1, 1, 1)
        bias.masked_fill_(mask.view(b, 1, 1, n) == 0, torch.finfo(dtype).min)
        s = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d)
        a = torch.softmax(s.float(), dim=-1).to(dtype)
        x = x + F_linear(torch.einsum("bnij,bjnc->binc", a, v).reshape(b, n, h * d), w[p + "attn.o.weight"])
        y = rms(x, w[p + "norm2.weight"])
        g = F_linear(y, w[p + "ffn.gate.0.weight"])
        g = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * torch.pow(g, 3.0))))
        x = x + F_linear(F_linear(y, w[p + "ffn.fc1.weight"]) * g, w[p + "ffn.fc2.weight"])
    return rms(x, w["norm.weight"])


F_linear = torch.nn.functional.linear


def _masked_rel_err(a, b, mask):
    m = mask.bool()
    return rel_err(a[m], b[m])


# ---- golden -----------------------------------------------------------------------------------
def test_encoder_matches_golden(tiny_encoder, t5_golden):
    ids, mask, out = t5_golden["ids"], t5_golden["mask"], t5_golden["out"]
    states = tiny_encoder.encode_ids(ids, mask)
    assert [s.shape[0] for s in states] == mask.sum(1).tolist()
    for i, s in enumerate(states):
        assert s.shape == (int(mask[i].sum()), out.shape[-1])
        err = rel_err(s, out[i, : s.shape[0]])
        assert err <= TOL, f"prompt {i}: rel err {err:.3g}"


def test_restated_reference_matches_golden(tiny_pth, tiny_encoder, t5_golden):
    """The fp64 restatement agrees with the golden, so it can stand in for Wan below."""
    state = _load_torch_state(tiny_pth)
    ref = _wan_t5_ref(state, tiny_encoder.config, t5_golden["ids"], t5_golden["mask"], torch.float64)
    assert _masked_rel_err(ref, t5_golden["out"], t5_golden["mask"]) <= TOL


def test_bf16_follows_wan_op_order(tiny_pth, tokenizer_dir, t5_golden):
    """In bf16 we run Wan's op sequence (eager attention, fp32 softmax, fp32 norm statistics):
    agreement with a bf16 Wan is far tighter than bf16's own error (~8e-3 against fp64)."""
    enc = TextEncoder.from_checkpoint(tiny_pth, tokenizer_dir, device="cpu", dtype=torch.bfloat16)
    ids, mask = t5_golden["ids"], t5_golden["mask"]
    state = _load_torch_state(tiny_pth)
    wan_bf16 = _wan_t5_ref(state, enc.config, ids, mask, torch.bfloat16)
    ours = enc.encode_ids(ids, mask)
    assert all(s.dtype == torch.bfloat16 for s in ours)
    assert enc.model.encoder.embed_tokens.weight.data_ptr() == enc.model.shared.weight.data_ptr()
    for i, s in enumerate(ours):
        assert rel_err(s, wan_bf16[i, : s.shape[0]]) <= 1e-3


def test_trimmed_padding_equals_full_padding(tiny_encoder):
    """encode_ids drops columns past the longest prompt; Wan runs all 512. Same real-token states."""
    ids, mask = tiny_encoder.tokenize(["a red fox jumps over the lazy dog", "snow"])
    assert ids.shape == (2, 512)
    trimmed = tiny_encoder.encode_ids(ids, mask)
    with torch.no_grad():
        full = tiny_encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, s in enumerate(trimmed):
        assert rel_err(s, full[i, : s.shape[0]]) <= 1e-6


# ---- key mapping ------------------------------------------------------------------------------
def _coverage(cfg: T5Config, source_keys: list[str]):
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg))
    targets = set(model.state_dict())
    mapped = [t for k in source_keys for t in map_wan_t5_key(k)]
    assert len(mapped) == len(set(mapped)), "two source keys map onto one target"
    assert set(mapped) == targets, (sorted(set(mapped) - targets), sorted(targets - set(mapped)))


def test_every_key_used_and_filled_tiny(tiny_pth):
    state = _load_torch_state(tiny_pth)
    cfg = T5Config.from_json(tiny_pth.parent / "config.json")
    assert sorted(state) == sorted(_wan_keys(cfg.num_layers))  # the table's view of Wan's layout
    _coverage(cfg, list(state))


def test_every_key_used_and_filled_xxl():
    _coverage(T5Config(), _wan_keys(T5Config().num_layers))  # UMT5-XXL, built on meta only


def test_unknown_key_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="not part of Wan's UMT5 encoder"):
        convert_wan_t5_state_dict({"decoder.blocks.0.attn.q.weight": torch.zeros(1)})


def test_model_has_no_meta_tensors(tiny_encoder):
    assert not any(p.is_meta for p in tiny_encoder.model.parameters())
    emb = tiny_encoder.model.encoder.embed_tokens.weight
    assert emb.data_ptr() == tiny_encoder.model.shared.weight.data_ptr()  # one copy of the embedding


# ---- files and errors -------------------------------------------------------------------------
def test_missing_checkpoint_names_file_and_hint(tmp_path, tokenizer_dir):
    with pytest.raises(CheckpointError, match=rf"{T5_CHECKPOINT} is missing.*huggingface-cli download"):
        TextEncoder.from_checkpoint(tmp_path, tokenizer_dir)


def test_missing_tokenizer_names_folder(tmp_path, tiny_pth):
    shutil.copy(tiny_pth, tmp_path / T5_CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"google/umt5-xxl is missing.*huggingface-cli download"):
        TextEncoder.from_checkpoint(tmp_path)


def test_wrong_sizes_are_a_checkpoint_error(tmp_path, tiny_pth, tokenizer_dir):
    shutil.copy(tiny_pth, tmp_path / T5_CHECKPOINT)
    (tmp_path / "t5_config.json").write_text('{"vocab": 512, "dim": 32, "dim_attn": 32, "dim_ffn": 128, '
                                            '"num_heads": 4, "num_layers": 2, "num_buckets": 32}')
    with pytest.raises(CheckpointError, match="does not match the T5 config"):
        TextEncoder.from_checkpoint(tmp_path, tokenizer_dir, dtype=torch.float32)


def test_dit_config_json_is_not_read_as_t5(tmp_path):
    """Wan2.1-style folders keep the DiT's config.json next to the T5 .pth: ignore it."""
    (tmp_path / "config.json").write_text('{"dim": 5120, "num_heads": 40, "num_layers": 40, "ffn_dim": 13824}')
    assert _read_config(tmp_path / T5_CHECKPOINT) == T5Config()


def test_legacy_torch_save_format_loads(tmp_path, tiny_pth, tokenizer_dir, t5_golden):
    """Files written without the zip format cannot be mmapped; they are read whole."""
    state = _load_torch_state(tiny_pth)
    torch.save(state, tmp_path / T5_CHECKPOINT, _use_new_zipfile_serialization=False)
    shutil.copy(tiny_pth.parent / "config.json", tmp_path / "config.json")
    enc = TextEncoder.from_checkpoint(tmp_path, tokenizer_dir, dtype=torch.float32)
    s = enc.encode_ids(t5_golden["ids"][:1], t5_golden["mask"][:1])[0]
    assert rel_err(s, t5_golden["out"][0, : s.shape[0]]) <= TOL


def test_mask_must_be_right_padding(tiny_encoder):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix"):
        tiny_encoder.encode_ids(ids, torch.tensor([[0, 1, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        tiny_encoder.encode_ids(ids[0], torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="list of strings"):
        tiny_encoder.encode("a single string")


# ---- bundle: upstream folder layout, tokenizer, cleaning -------------------------------------
def test_bundle_folder_loads_with_its_t5_config(bundle):
    enc = TextEncoder.from_checkpoint(bundle, device="cpu", dtype=torch.float32)
    assert enc.config == T5Config.from_json(bundle / "t5_config.json")
    assert enc.config.text_len == 512
    assert type(enc.tokenizer).__name__  # AutoTokenizer resolved something
    assert enc.tokenizer.eos_token == "</s>" and enc.tokenizer.pad_token_id == 0


@pytest.mark.parametrize("raw, clean", [
    ("a &amp;lt;b&amp;gt; tag &quot;x&quot;", 'a <b> tag "x"'),  # entities unescaped twice
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("cafÃ© au lait", "café au lait"),  # mojibake (UTF-8 read as Latin-1) repaired by ftfy
    ("  a\tcat\n\n on   a\u3000mat \r\n", "a cat on a mat"),  # whitespace runs -> one space, stripped
    ("no change", "no change"),
])
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


def test_encode_lengths_are_real_token_counts(bundle):
    enc = TextEncoder.from_checkpoint(bundle, device="cpu", dtype=torch.float32)
    prompts = ["A girl in a red coat walks &amp; talks.", "  snow   falls \n", "",
               "word " * 600]  # the last one is truncated to text_len
    states = enc.encode(prompts)
    expected = [min(len(enc.tokenizer(clean_prompt(p), add_special_tokens=True)["input_ids"]), 512)
                for p in prompts]
    assert [s.shape[0] for s in states] == expected
    assert expected[2] == 1 and expected[3] == 512  # "" is just </s>; long prompts stop at 512
    assert all(s.shape[1] == enc.config.dim for s in states)
    ids, mask = enc.tokenize(prompts)
    assert ids.shape == mask.shape == (4, 512)
    assert ids[3, -1].item() == enc.tokenizer.eos_token_id  # truncation keeps </s>, like Wan
    # Cleaning happens before tokenization: a messy prompt encodes exactly like its clean form.
    messy, tidy = enc.encode(["  cafÃ©\n\tnoir &amp;amp; ", "café noir &"])
    assert torch.equal(messy, tidy)
