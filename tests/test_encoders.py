"""ONNX frontend encoders (speech tokenizer, campplus) on the random stand-ins of
``tuning.onnx_standins``: ORT equals torch, shapes, session reuse, input feeding by position, and
clear errors for wrong, truncated, non-ONNX and missing files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tuning.onnx_standins import (
    CAMPPLUS_NAME,
    SPEECH_TOKENIZER_NAME,
    SpeakerEncoderStandin,
    SpeechTokenizerStandin,
    export_speaker_encoder,
    export_speech_tokenizer,
    write_onnx_standins,
)
from worker.frontend.audio import campplus_fbank, load_audio, resample, whisper_logmel_128
from worker.frontend.encoders import (
    EncoderError,
    SpeakerEncoderONNX,
    SpeechTokenizerONNX,
    clear_session_cache,
)

SEED = 0
# ORT vs torch on the same fp32 graph: different kernels, so rounding differs (measured ~1.4e-6).
EMB_TOL = 1e-4


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("standins")
    tok, spk = write_onnx_standins(d, seed=SEED)
    assert tok == d / SPEECH_TOKENIZER_NAME and spk == d / CAMPPLUS_NAME
    return d


@pytest.fixture(scope="module")
def feats(fixtures_dir: Path):
    x, sr = load_audio(fixtures_dir / "prompts" / "en_1272_128104_000003_000001.wav")
    x16 = resample(x, sr, 16000)
    mel, lengths = whisper_logmel_128(x16)
    return mel, lengths, campplus_fbank(x16)


def _torch_tokens(module: SpeechTokenizerStandin, mel, n: int):
    lengths = torch.tensor([n], dtype=torch.int32)
    with torch.no_grad():
        tokens = module(mel, lengths)[0].reshape(-1).long().numpy()
        margin = float((module.pre_quant(mel, lengths).abs() - 0.5).abs().min())
    return tokens, margin


def test_standin_files_are_small(standins):
    for name in (SPEECH_TOKENIZER_NAME, CAMPPLUS_NAME):
        assert 0 < (standins / name).stat().st_size < 1_000_000


def test_speech_tokens_match_torch(standins, feats):
    mel, lengths, _ = feats
    T = mel.shape[2]
    tok = SpeechTokenizerONNX(standins / SPEECH_TOKENIZER_NAME)
    out = tok(mel, int(lengths[0]))
    assert out.dtype == np.int64 and out.ndim == 1
    # the stand-in emits ceil(T/4) tokens (the real tokenizer: about T/4, 25 Hz)
    assert out.shape[0] == math.ceil(T / 4)
    assert out.min() >= 0 and out.max() < 6561
    assert len(np.unique(out)) > 10  # not a constant code
    ref, margin = _torch_tokens(SpeechTokenizerStandin(SEED), mel, T)
    assert margin > 1e-5, "a code sits on a rounding boundary: kernel rounding could flip it"
    np.testing.assert_array_equal(out, ref)
    # numpy input, the lengths tensor of whisper_logmel_128, and the default length agree
    np.testing.assert_array_equal(tok(mel.numpy(), lengths), out)
    np.testing.assert_array_equal(tok(mel), out)


def test_speech_tokens_dynamic_length(standins, feats):
    mel, _, _ = feats
    tok = SpeechTokenizerONNX(standins / SPEECH_TOKENIZER_NAME)
    module = SpeechTokenizerStandin(SEED)
    for T in (1, 4, 5, 123):
        out = tok(mel[:, :, :T])
        assert out.shape == (math.ceil(T / 4),)
        ref, margin = _torch_tokens(module, mel[:, :, :T], T)
        if margin > 1e-5:
            np.testing.assert_array_equal(out, ref)
    # lengths shorter than T mask the tail, as the torch module does
    out = tok(mel[:, :, :200], 150)
    ref, margin = _torch_tokens(module, mel[:, :, :200], 150)
    assert out.shape == (50,)
    if margin > 1e-5:
        np.testing.assert_array_equal(out, ref)


def test_speaker_embedding_matches_torch(standins, feats):
    _, _, fbank = feats
    spk = SpeakerEncoderONNX(standins / CAMPPLUS_NAME)
    emb = spk(fbank)
    assert emb.shape == (1, 192) and emb.dtype == np.float32
    with torch.no_grad():
        ref = SpeakerEncoderStandin(SEED + 1)(fbank).numpy()
    assert np.abs(emb - ref).max() <= EMB_TOL
    assert np.abs(spk(fbank.numpy()) - emb).max() == 0.0


def test_sessions_are_reused(standins):
    a = SpeechTokenizerONNX(standins / SPEECH_TOKENIZER_NAME)
    b = SpeechTokenizerONNX(str(standins / SPEECH_TOKENIZER_NAME))
    assert a.session is b.session
    c = SpeakerEncoderONNX(standins / CAMPPLUS_NAME)
    d = SpeakerEncoderONNX(standins / CAMPPLUS_NAME)
    assert c.session is d.session
    e = SpeakerEncoderONNX(standins / CAMPPLUS_NAME, threads=2)
    assert e.session is not c.session
    clear_session_cache()
    assert SpeakerEncoderONNX(standins / CAMPPLUS_NAME).session is not c.session


def test_session_options(standins):
    spk = SpeakerEncoderONNX(standins / CAMPPLUS_NAME, threads=2)
    assert spk.session.get_providers() == ["CPUExecutionProvider"]
    opts = spk.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    with pytest.raises(ValueError, match="threads"):
        SpeakerEncoderONNX(standins / CAMPPLUS_NAME, threads=0)


def test_inputs_fed_by_position(tmp_path, feats):
    mel, lengths, fbank = feats
    module = SpeechTokenizerStandin(SEED, token_dtype=torch.int64)
    path = export_speech_tokenizer(module, tmp_path / "tok.onnx", ("x0", "len"), ("a", "b"))
    tok = SpeechTokenizerONNX(path)
    assert [i.name for i in tok.session.get_inputs()] == ["x0", "len"]
    assert tok.session.get_outputs()[0].type == "tensor(int64)"  # int64 tokens accepted
    ref, _ = _torch_tokens(module, mel, mel.shape[2])
    np.testing.assert_array_equal(tok(mel, lengths), ref)

    spk_path = export_speaker_encoder(SpeakerEncoderStandin(3), tmp_path / "spk.onnx", "zz", "y")
    emb = SpeakerEncoderONNX(spk_path)(fbank)
    with torch.no_grad():
        ref_emb = SpeakerEncoderStandin(3)(fbank).numpy()
    assert np.abs(emb - ref_emb).max() <= EMB_TOL


def test_wrong_model_files(standins):
    tok_path, spk_path = standins / SPEECH_TOKENIZER_NAME, standins / CAMPPLUS_NAME
    with pytest.raises(EncoderError, match=r"campplus\.onnx.*1 input"):
        SpeechTokenizerONNX(spk_path)
    with pytest.raises(EncoderError, match=r"speech_tokenizer_v3\.onnx.*2 input"):
        SpeakerEncoderONNX(tok_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy exporter
def test_wrong_feature_dim(tmp_path):
    class Wrong(torch.nn.Module):  # one rank-3 float input with 128 bins: not campplus
        def forward(self, x):
            return x.mean(1)

    path = tmp_path / "wrong.onnx"
    torch.onnx.export(
        Wrong(), (torch.zeros(1, 10, 128),), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "T"}},
    )  # fmt: skip
    with pytest.raises(EncoderError, match=r"wrong\.onnx.*expected 80"):
        SpeakerEncoderONNX(path)


def test_bad_files(standins, tmp_path):
    data = (standins / CAMPPLUS_NAME).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "not_onnx.onnx"
    text.write_text("this is not an ONNX model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        for cls in (SpeechTokenizerONNX, SpeakerEncoderONNX):
            with pytest.raises(EncoderError, match=path.name):
                cls(path)
    with pytest.raises(EncoderError, match=r"not found.*missing\.onnx"):
        SpeakerEncoderONNX(tmp_path / "missing.onnx")


def test_bad_inputs(standins, feats):
    mel, _, fbank = feats
    tok = SpeechTokenizerONNX(standins / SPEECH_TOKENIZER_NAME)
    spk = SpeakerEncoderONNX(standins / CAMPPLUS_NAME)
    with pytest.raises(EncoderError, match="128"):
        tok(mel[:, :80])
    with pytest.raises(EncoderError, match="length"):
        tok(mel, mel.shape[2] + 1)
    with pytest.raises(EncoderError, match="3000"):
        tok(torch.zeros(1, 128, 3001))
    with pytest.raises(EncoderError, match="80"):
        spk(fbank.transpose(1, 2))
