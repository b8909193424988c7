"""Several residual streams in one model: an encoder's and a decoder's (T5, Whisper), a stream left as it was with the
reason, the user's choice of streams (`filter_fn`), and what users do around such a model: KV-cache generate,
save_pretrained / from_pretrained with the settings check, hooks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import zoo
from torch import nn
from transformers import AutoConfig, T5ForConditionalGeneration, WhisperForConditionalGeneration

import attnres_fx
from attnres_fx.hooks import _DepthForward


def t5() -> nn.Module:
    config = AutoConfig.for_model(
        "t5", vocab_size=zoo.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return zoo.unit_scale_(T5ForConditionalGeneration(config)).eval()


def whisper() -> nn.Module:
    config = AutoConfig.for_model(
        "whisper", vocab_size=zoo.VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return zoo.unit_scale_(WhisperForConditionalGeneration(config)).eval()


def encoder_inputs(name: str) -> dict[str, torch.Tensor]:
    if name == "t5":
        return {"input_ids": zoo.token_ids(2, 12, seed=2)}
    return {"input_features": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))}


MODELS = {"t5": (t5, ("encoder", "decoder")), "whisper": (whisper, ("model.encoder", "model.decoder"))}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    make, _ = MODELS[request.param]
    model = make()
    return request.param, copy.deepcopy(model), attnres_fx.transform(model)  # example inputs from the config


def test_encoder_and_decoder_are_each_a_stream_with_their_own_blocks(pair) -> None:
    name, original, tmodel = pair
    tplan = attnres_fx.plan(tmodel)
    assert tuple(s.root for s in tplan.streams) == MODELS[name][1] and not tplan.skipped
    assert [len(s.sites) for s in tplan.streams] == [4, 6]  # 2 layers; the decoder's have cross-attention
    assert [s.name for s in tplan.streams] == ["stream_0", "stream_1"]
    assert tmodel.get_parameter("attnres.stream_1.final.query").shape == (32,)
    ids, x = zoo.token_ids(2, 5, seed=3), encoder_inputs(name)
    with torch.no_grad():
        out, expected = tmodel(**x, decoder_input_ids=ids), original(**x, decoder_input_ids=ids)
    assert zoo.rel_err(out.logits, expected.logits) < 1e-4
    assert zoo.rel_err(out.encoder_last_hidden_state, expected.encoder_last_hidden_state) < 1e-4
    assert "Block AttnRes in `" in str(tplan) and str(tplan).count("Block AttnRes") == 2


def test_decoding_with_the_kv_cache_equals_recomputing_every_step(pair) -> None:
    """Greedy decoding, one token at a time through the model's own cache (the encoder runs once), against the whole
    decoder sequence recomputed without a cache at every step."""
    name, original, tmodel = pair
    inputs = encoder_inputs(name)
    tmodel = zoo.random_depth_(copy.deepcopy(tmodel), 0.5, 7)
    start = torch.full((2, 1), original.config.decoder_start_token_id)
    with torch.no_grad():
        encoded = tmodel.get_encoder()(**inputs)
        tokens, past = start, None
        for _ in range(6):
            last = tokens[:, -1:]
            step = tmodel(encoder_outputs=encoded, decoder_input_ids=last, past_key_values=past, use_cache=True)
            past = step.past_key_values
            recomputed = tmodel(**inputs, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
            assert zoo.rel_err(step.logits[:, -1], recomputed) < 1e-4
            tokens = torch.cat([tokens, recomputed.argmax(-1, keepdim=True)], dim=1)
        plain = original(**inputs, decoder_input_ids=tokens).logits
    assert zoo.rel_err(tmodel(**inputs, decoder_input_ids=tokens).logits, plain) > 1e-2  # the queries matter


def test_t5_generate_with_the_kv_cache_is_the_original_at_zero_init_and_changes_with_queries(pair) -> None:
    name, original, tmodel = pair
    if name != "t5":
        pytest.skip("Whisper's generate is a speech pipeline of its own; its decoding is tested above")
    inputs, greedy = encoder_inputs(name), dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(tmodel.generate(**inputs, **greedy), original.generate(**inputs, **greedy))
        moved = zoo.random_depth_(copy.deepcopy(tmodel), 0.5, 7)
        assert not torch.equal(moved.generate(**inputs, **greedy), original.generate(**inputs, **greedy))


def test_filter_fn_chooses_the_decoder_and_leaves_the_encoder_as_it_was() -> None:
    model = t5()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, filter_fn=lambda module, path: path == "decoder")
    tplan = attnres_fx.plan(tmodel)
    assert [s.root for s in tplan.streams] == ["decoder"] and len(tplan.sites) == 6
    assert [(s.root, s.reason) for s in tplan.skipped] == [("encoder", "not chosen by filter_fn")]
    assert not any(isinstance(m.forward, _DepthForward) for m in tmodel.encoder.modules())
    assert "attnres.site_1.query" in tmodel.state_dict()  # one stream transformed: the single-stream names
    x = encoder_inputs("t5")["input_ids"]
    with torch.no_grad():
        zoo.random_depth_(tmodel)
        assert torch.equal(tmodel.encoder(x).last_hidden_state, original.encoder(x).last_hidden_state)


def test_save_pretrained_and_from_pretrained_keep_both_streams_and_check_settings(tmp_path) -> None:
    tmodel = zoo.random_depth_(attnres_fx.transform(t5(), block_size=2))
    tmodel.save_pretrained(tmp_path)
    loaded = attnres_fx.from_pretrained(T5ForConditionalGeneration, tmp_path)
    ids, x = zoo.token_ids(2, 5, seed=3), encoder_inputs("t5")["input_ids"]
    with torch.no_grad():
        expected = tmodel(input_ids=x, decoder_input_ids=ids).logits
        assert torch.equal(loaded(input_ids=x, decoder_input_ids=ids).logits, expected)
    assert attnres_fx.plan(loaded).streams == attnres_fx.plan(tmodel).streams
    other = attnres_fx.transform(t5(), block_size=1)
    with pytest.raises(attnres_fx.AttnResError, match="block_size 2"):
        other.load_state_dict(tmodel.state_dict())


class TwoStreams(nn.Module):
    """A pre-norm stream, and a second one whose end is returned raw."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed_a, self.embed_b = nn.Embedding(zoo.VOCAB, d), nn.Embedding(zoo.VOCAB, d)
        self.a = zoo.Residual3D(d, layers=3)
        self.b = zoo.RawHiddenOutput(d, layers=2)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed, raw = self.b(self.embed_b(ids))
        return self.a(self.embed_a(ids)) + normed, raw


def test_a_stream_that_cannot_be_transformed_is_left_as_it_was_with_a_warning_and_the_reason() -> None:
    torch.manual_seed(0)
    model = zoo.unit_scale_(TwoStreams())
    original, ids = copy.deepcopy(model), zoo.token_ids()
    with pytest.warns(UserWarning, match=r"left `b` \(2 sublayers\) as it was: the stream after sublayer 1 is read"):
        tmodel = attnres_fx.transform(model, (ids,))
    tplan = attnres_fx.plan(tmodel)
    assert [s.root for s in tplan.streams] == ["a"] and [s.root for s in tplan.skipped] == ["b"]
    assert "left as it was: `b` (2 sublayers)" in str(tplan)
    with torch.no_grad():
        zoo.random_depth_(tmodel)
        out, raw = tmodel(ids)
        expected, expected_raw = original(ids)
    assert torch.equal(raw, expected_raw) and zoo.rel_err(out, expected) > 1e-2  # b untouched, a transformed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(attnres_fx.AttnResError, match="returns stream values without a norm"):
            attnres_fx.transform(zoo.unit_scale_(TwoStreams()), (ids,), filter_fn=lambda m, path: path == "b")


def llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=zoo.VOCAB + 1,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=zoo.VOCAB, vision_feature_layer=-1)
    torch.manual_seed(0)
    return zoo.unit_scale_(LlavaForConditionalGeneration(config)).eval()


def test_llava_transforms_its_language_model_and_says_why_the_vision_tower_is_left() -> None:
    """Example inputs from the config: an image and one image token per patch feature. The vision features are the
    tower's raw hidden states (then a projector): that stream is left as it was, named with the reason."""
    model = llava()
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"left `model.vision_tower.encoder` \(4 sublayers\) as it was"):
        tmodel = attnres_fx.transform(model)  # no example inputs: built from the config
    tplan = attnres_fx.plan(tmodel)
    assert [(s.root, len(s.sites)) for s in tplan.streams] == [("model.language_model", 4)]
    assert [s.root for s in tplan.skipped] == ["model.vision_tower.encoder"]
    image_tokens = torch.full((2, 16), zoo.VOCAB)
    ids = torch.cat([image_tokens, zoo.token_ids(2, 6)], dim=1)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = original(input_ids=ids, pixel_values=pixels).logits
        assert zoo.rel_err(tmodel(input_ids=ids, pixel_values=pixels).logits, expected) < 1e-4
        cached = tmodel.generate(input_ids=ids, pixel_values=pixels, **greedy)  # through the LM's KV cache
        assert torch.equal(cached, original.generate(input_ids=ids, pixel_values=pixels, **greedy))
        zoo.random_depth_(tmodel)
        assert zoo.rel_err(tmodel(input_ids=ids, pixel_values=pixels).logits, expected) > 1e-2
