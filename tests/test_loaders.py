"""Offline loading: diffusers folders, original-layout single files, empty-prompt context, missing paths."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from cdad_dist.errors import CdadError
from cdad_dist.models import loaders
from cdad_dist.models.presets import ModelConfig, build_model, resolve_config, unet_kwargs, vae_kwargs

# A small SD-1.5-shaped model: same block types / key layout, tiny widths.
SMALL = dict(preset="sd15", image_size=32, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
             context_tokens=77, amn_depth=1, amn_heads=2, amn_neighbour=1,
             vae_block_out_channels=(32, 32, 32, 32), vae_layers_per_block=1)


def small_parts(seed: int = 0):
    cfg = resolve_config(ModelConfig(**SMALL))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs(cfg, 4))
    vae = AutoencoderKL(**vae_kwargs(cfg))
    return cfg, unet, vae


# ---- diffusers → original LDM key names (the inverse of diffusers' convert_ldm_*; written here for the test) ----
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _resnet_ldm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_to_ldm(sd: dict, layers: int) -> dict:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
    out = {}
    for key, val in sd.items():
        mod, _, param = key.rpartition(".")
        if mod in fixed:
            new = f"{fixed[mod]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (layers + 1) + l}.0.{_resnet_ldm(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_ldm(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * (layers + 1) + int(m[2])}.0.{_resnet_ldm(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{b * (layers + 1) + layers}.{2 if b in up_has_attn else 1}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped U-Net key {key}")
        out["model.diffusion_model." + new] = val
    return out


def vae_to_ldm(sd: dict, n_blocks: int) -> dict:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, val in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and val.ndim == 2:
                val = val[:, :, None, None]  # LDM uses 1×1 convs
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = val
    return out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def parts():
    return small_parts()


@pytest.fixture(scope="module")
def diffusers_folder(parts, tmp_path_factory):
    _, unet, vae = parts
    root = tmp_path_factory.mktemp("sd_folder")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def single_file(parts, tmp_path_factory):
    cfg, unet, vae = parts
    state = {**unet_to_ldm(unet.state_dict(), cfg.layers_per_block),
             **vae_to_ldm(vae.state_dict(), len(cfg.vae_block_out_channels))}
    path = tmp_path_factory.mktemp("sd_file") / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_diffusers_folder_round_trip(parts, diffusers_folder):
    cfg, unet, vae = parts
    assert_same_weights(loaders.load_unet(diffusers_folder), unet)
    assert_same_weights(loaders.load_vae(diffusers_folder), vae)
    assert_same_weights(loaders.load_vae(diffusers_folder / "vae"), vae)  # a bare VAE folder works too


def test_single_file_round_trip(parts, single_file):
    cfg, unet, vae = parts
    assert_same_weights(loaders.load_unet(single_file, unet_kwargs(cfg, 4)), unet)
    assert_same_weights(loaders.load_vae(single_file, vae_kwargs(cfg)), vae)


def test_ckpt_with_state_dict_key(parts, single_file, tmp_path):
    cfg, unet, _ = parts
    from safetensors.torch import load_file

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, path)
    assert_same_weights(loaders.load_unet(path, unet_kwargs(cfg, 4)), unet)


def test_build_model_from_both_formats(parts, diffusers_folder, single_file):
    _, unet, vae = parts
    for path in (diffusers_folder, single_file):
        model = build_model(ModelConfig(**SMALL, pretrained_path=str(path)))
        assert_same_weights(model.unet, unet)
        assert_same_weights(model.first_stage.vae, vae)
        assert model.context.shape == (1, 77, 32)
        x = torch.rand(1, 3, 32, 32)
        out = model(x, x, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["loss"])


def test_single_file_that_does_not_fit_the_config(single_file):
    cfg = resolve_config(ModelConfig(**{**SMALL, "block_out_channels": (32, 96)}))
    with pytest.raises(CdadError, match="tiny-sd.safetensors"):
        loaders.load_unet(single_file, unet_kwargs(cfg, 4))


def test_missing_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "no_such_model"
    for fn in (loaders.load_unet, loaders.load_vae):
        with pytest.raises(CdadError, match="no_such_model"):
            fn(missing)
    with pytest.raises(CdadError, match="no_such_model"):
        build_model(ModelConfig(**SMALL, pretrained_path=str(missing)))
    with pytest.raises(CdadError, match="unet/config.json"):
        loaders.load_unet(tmp_path)  # a folder, but not a diffusers one
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(CdadError, match="U-Net"):
        loaders.load_unet(tmp_path)  # config but no weights
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CdadError, match="broken.safetensors"):
        loaders.read_single_file(bad)


def _tiny_clip(folder):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=77).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1))
    enc.save_pretrained(folder / "text_encoder")
    return enc


def test_context_from_local_clip(parts, diffusers_folder, tmp_path):
    import shutil

    root = tmp_path / "sd_with_clip"
    shutil.copytree(diffusers_folder, root)
    enc = _tiny_clip(root)
    ctx = loaders.find_empty_prompt_context(root)
    ids = torch.tensor([[0] + [1] * 76])  # BOS, EOS, then EOS as padding (CLIP's pad token)
    with torch.no_grad():
        ref = enc.eval()(ids)[0]
    torch.testing.assert_close(ctx, ref)
    model = build_model(ModelConfig(**SMALL, pretrained_path=str(root)))
    torch.testing.assert_close(model.context, ref)


def test_context_from_file_and_zero_fallback(parts, diffusers_folder, tmp_path, caplog):
    ctx = torch.randn(1, 77, 32)
    path = tmp_path / "ctx.safetensors"
    loaders.save_empty_prompt(ctx, path)
    torch.testing.assert_close(loaders.load_empty_prompt(path), ctx)
    model = build_model(ModelConfig(**SMALL, pretrained_path=str(diffusers_folder), context_path=str(path)))
    torch.testing.assert_close(model.context, ctx)
    with caplog.at_level(logging.WARNING):
        model = build_model(ModelConfig(**SMALL, pretrained_path=str(diffusers_folder)))
    assert torch.equal(model.context, torch.zeros(1, 77, 32))
    assert "zero empty-prompt context" in caplog.text


def test_context_next_to_single_file(single_file, tmp_path):
    import shutil

    path = tmp_path / single_file.name
    shutil.copy(single_file, path)
    ctx = torch.randn(1, 77, 32)
    loaders.save_empty_prompt(ctx, tmp_path / loaders.EMPTY_PROMPT_FILE)
    torch.testing.assert_close(loaders.find_empty_prompt_context(path), ctx)
