"""Flow stage (worker/flow.py, worker/dit.py) against the upstream goldens of the tiny model,
and the flow.pt layout at official dims (meta device, no memory)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import max_abs
from worker.checkpoint import (
    CheckpointError,
    assign_state_dict,
    load_state_dict_file,
    meta_state_dict,
)
from worker.dit import apply_rotary, attend, attention_mask, block_causal_mask, rope_inv_freq
from worker.flow import INV_FREQ_KEY, Flow, checkpoint_shapes, convert_checkpoint
from worker.noise import fixed_noise_for

# Goldens were made on an AVX2 CPU; with ATEN_CPU_CAPABILITY=avx2 (+ MKL/oneDNN limited to
# AVX2) this port reproduces them bit for bit, on AVX-512 it differs by ~1e-6.
MEL_TOL = 1e-4


@pytest.fixture(scope="module")
def official_flow_cfg(tiny_config):
    tiny = tiny_config.flow
    dit = dataclasses.replace(tiny.dit, dim=1024, depth=22, heads=16, dim_head=64)
    return dataclasses.replace(tiny, pre_lookahead_channels=1024, dit=dit)


@pytest.fixture(scope="module")
def official_manifest(fixtures_dir) -> dict[str, tuple[int, ...]]:
    shapes = json.loads((fixtures_dir / "cosyvoice3-shapes.json").read_text())["flow"]
    return {k: tuple(v) for k, v in shapes.items()}


# --- DiT estimator alone -------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_dit_matches_upstream_on_cfg_batch(flow, golden, streaming):
    d = golden["dit"]
    with torch.inference_mode():
        out = flow.decoder.estimator(
            d["x"], d["mask"], d["mu"], d["t"], d["spks"], d["cond"], streaming
        )
    err = max_abs(out, d[f"out_streaming_{str(streaming).lower()}"])
    assert err < MEL_TOL, f"DiT streaming={streaming}: max |diff| {err:.3g}"


def test_block_causal_mask_sees_own_block_and_everything_before():
    m = block_causal_mask(7, 3)
    for i in range(7):
        for j in range(7):
            assert m[i, j].item() == (j < (i // 3 + 1) * 3), (i, j)


def test_padding_mask_hides_padded_keys_like_upstream():
    mask = torch.ones(2, 1, 6)
    mask[1, 0, 4:] = 0  # row 1: frames 4, 5 are padding
    full = attention_mask(mask, 0)  # (2, 1, 6, 6)
    assert torch.equal(full[0, 0], torch.ones(6, 6, dtype=torch.bool))
    assert torch.equal(full[1, 0], mask[1].bool().expand(6, 6))
    chunked = attention_mask(mask, 3)
    assert torch.equal(chunked[1, 0], mask[1].bool() & block_causal_mask(6, 3))
    assert attention_mask(torch.ones(2, 1, 6), 0) is None
    assert torch.equal(attention_mask(torch.ones(2, 1, 6), 3), block_causal_mask(6, 3)[None, None])


def test_unpadded_masks_give_the_same_bits_as_upstreams_full_masks():
    q, k, v = (torch.randn(2, 120, 64) for _ in range(3))
    ones = torch.ones(2, 1, 120, 120, dtype=torch.bool)
    assert torch.equal(attend(q, k, v, 4, None), attend(q, k, v, 4, ones))
    blocks = block_causal_mask(120, 50)[None, None]
    assert torch.equal(attend(q, k, v, 4, blocks), attend(q, k, v, 4, blocks.repeat(2, 1, 1, 1)))


def test_streaming_dit_output_of_a_block_ignores_later_frames(flow, golden):
    d = golden["dit"]  # T = 70: blocks [0, 50) and [50, 70)
    x2 = d["x"].clone()
    x2[:, :, 50:] += torch.randn_like(x2[:, :, 50:])
    with torch.inference_mode():
        a = flow.decoder.estimator(d["x"], d["mask"], d["mu"], d["t"], d["spks"], d["cond"], True)
        b = flow.decoder.estimator(x2, d["mask"], d["mu"], d["t"], d["spks"], d["cond"], True)
        full = flow.decoder.estimator(x2, d["mask"], d["mu"], d["t"], d["spks"], d["cond"], False)
    assert torch.equal(a[:, :, :50], b[:, :, :50])
    assert (a[:, :, 50:] - b[:, :, 50:]).abs().max() > 1e-3
    assert (full[:, :, :50] - b[:, :, :50]).abs().max() > 1e-3  # full attention looks ahead


def test_rope_rotates_only_the_first_dim_head_channels():
    dim_head, width = 16, 64
    angles = torch.arange(5).float().unsqueeze(1) * rope_inv_freq(dim_head)  # (5, 8)
    angles = torch.stack((angles, angles), dim=-1).flatten(-2)  # (5, 16)
    x = torch.randn(2, 5, width)
    y = apply_rotary(x, (angles.cos(), angles.sin()))
    assert torch.equal(y[..., dim_head:], x[..., dim_head:])
    assert torch.equal(y[:, 0], x[:, 0])  # position 0: angle 0
    # pair (0, 1) at position 1 is rotated by inv_freq[0] = 1 rad
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    expect = torch.stack((x[:, 1, 0] * c - x[:, 1, 1] * s, x[:, 1, 1] * c + x[:, 1, 0] * s), -1)
    torch.testing.assert_close(y[:, 1, :2], expect)


# --- flow pieces and full inference --------------------------------------------------------


def test_speaker_projection(flow, golden):
    f = golden["flow"]
    with torch.inference_mode():
        err = max_abs(flow.spk_projection(f["embedding"]), f["spk_projected"])
    assert err < 1e-5, f"max |diff| {err:.3g}"


def test_pre_lookahead_of_prompt_and_tokens(flow, golden):
    f = golden["flow"]
    with torch.inference_mode():
        emb = flow.embed_tokens(torch.cat((f["prompt_token"], f["token"]), dim=1))
        err = max_abs(flow.pre_lookahead(emb), f["pre_lookahead_out"])
    assert err < 1e-5, f"max |diff| {err:.3g}"


@pytest.mark.parametrize("streaming", [False, True], ids=["nonstreaming", "streaming"])
def test_mel_matches_upstream_finalize(flow, golden, streaming):
    f = golden["flow"]
    mel = flow.inference(
        f["token"], f["prompt_token"], f["prompt_feat"], f["embedding"], streaming, True
    )
    assert mel.dtype == torch.float32
    name = "streaming" if streaming else "nonstreaming"
    err = max_abs(mel, f[f"mel_{name}_finalize"])
    assert err < MEL_TOL, f"mel {name}: max |diff| {err:.3g}"


def test_golden_stream_has_four_chunks(golden):
    assert len(golden["stream"]["chunks"]) == 4


@pytest.mark.parametrize("i", range(4))
def test_stream_chunk_mel_matches_upstream_token2wav(flow, golden, i):
    f, c = golden["flow"], golden["stream"]["chunks"][i]
    mel = flow.inference(
        f["token"][:, : c["token_len"]],
        f["prompt_token"],
        f["prompt_feat"],
        f["embedding"],
        streaming=c["flow_streaming_arg"],
        finalize=c["flow_finalize_arg"],
    )
    assert mel.shape[2] == c["flow_mel_frames"]
    err = max_abs(mel[:, :, 2 * c["token_offset"] :], c["mel_kept"])
    assert err < MEL_TOL, f"chunk {i}: max |diff| {err:.3g}"


def test_non_final_chunk_keeps_lookahead_tokens_as_context_only(flow, golden):
    f = golden["flow"]
    n, lookahead = 41, flow.cfg.pre_lookahead_len
    P, Tp = f["prompt_token"].shape[1], f["prompt_feat"].shape[1]
    args = (f["token"][:, :n], f["prompt_token"], f["prompt_feat"], f["embedding"])
    chunk = flow.inference(*args, streaming=True, finalize=False)
    assert chunk.shape == (1, 80, 2 * (P + n - lookahead) - Tp)
    final = flow.inference(*args, streaming=True, finalize=True)
    assert final.shape == (1, 80, 2 * (P + n) - Tp)


# --- checkpoint layout ---------------------------------------------------------------------


def test_recomputed_inv_freq_equals_the_stored_buffer(tiny_dir, tiny_config):
    sd = load_state_dict_file(tiny_dir / "flow.pt")
    stored = sd.pop(INV_FREQ_KEY)
    converted = convert_checkpoint(sd, tiny_config.flow, "flow.pt")
    assert torch.equal(converted[INV_FREQ_KEY], stored)


def test_loaded_flow_uses_checkpoint_tensors_in_eval_mode(tiny_dir, tiny_config, flow):
    assert not flow.training
    assert all(not t.is_meta for t in flow.state_dict().values())
    sd = convert_checkpoint(load_state_dict_file(tiny_dir / "flow.pt"), tiny_config.flow, "x")
    with torch.device("meta"):
        fresh = Flow(tiny_config.flow, flow.noise)
    assign_state_dict(fresh, sd, "x")
    for k, v in fresh.state_dict().items():
        assert v.data_ptr() == sd[k].data_ptr(), f"{k} was copied"


def test_checkpoint_shapes_at_official_dims_equal_the_release_manifest(
    official_flow_cfg, official_manifest
):
    assert checkpoint_shapes(official_flow_cfg) == official_manifest


def test_official_flow_on_meta_has_exactly_the_checkpoint_keys(
    official_flow_cfg, official_manifest, tiny_config
):
    with torch.device("meta"):
        model = Flow(official_flow_cfg, fixed_noise_for(tiny_config))
    module_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = convert_checkpoint(meta_state_dict(official_manifest), official_flow_cfg, "flow.pt")
    assert {k: tuple(v.shape) for k, v in sd.items()} == module_shapes
    assign_state_dict(model, sd, "flow.pt")  # strict: no missing or unexpected key


def test_missing_inv_freq_is_recomputed_on_meta(official_flow_cfg, official_manifest):
    sd = meta_state_dict(official_manifest)
    del sd[INV_FREQ_KEY]
    out = convert_checkpoint(sd, official_flow_cfg, "flow.pt")
    assert out[INV_FREQ_KEY].shape == (32,) and out[INV_FREQ_KEY].is_meta


def test_misshaped_key_is_named_in_the_error(official_flow_cfg, official_manifest):
    key = "decoder.estimator.transformer_blocks.3.attn.to_k.weight"
    sd = meta_state_dict(official_manifest)
    sd[key] = torch.empty(1024, 896, device="meta")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert_checkpoint(sd, official_flow_cfg, "flow.pt")


def test_tiny_checkpoint_against_official_config_is_refused(tiny_dir, official_flow_cfg):
    sd = load_state_dict_file(tiny_dir / "flow.pt")
    with pytest.raises(CheckpointError, match=r"flow\.pt: checkpoint does not match"):
        convert_checkpoint(sd, official_flow_cfg, tiny_dir / "flow.pt")
