"""Hugging Face models as users call them: model(**batch) returning an output with .loss, built from a config
(random weights), planned below store-all and run with remat.apply. Each one brings something the zoo does not:
Swin's nn.init.trunc_normal_ init (no fake-tensor build) and windowed attention, Whisper's encoder-decoder with
audio features, Mistral's grouped-query attention with a sliding window."""

import pytest
import torch
import transformers

from remat.training import apply

TIME_LIMIT = 3.0  # any plan that fits at 85% shows what these check (at 10 s, Whisper's search used 7 s of it)


def swin():
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                     window_size=4, num_labels=10)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64), "labels": torch.randint(0, 10, (2,))}
    return transformers.SwinForImageClassification(config), batch


def whisper():
    config = transformers.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        vocab_size=1000, num_mel_bins=16, max_source_positions=50,
                                        max_target_positions=64, decoder_start_token_id=1, pad_token_id=0)
    batch = {"input_features": torch.randn(2, 16, 100), "labels": torch.randint(2, 1000, (2, 16))}
    return transformers.WhisperForConditionalGeneration(config), batch


def mistral():
    config = transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                        sliding_window=32)
    ids = torch.randint(0, 1000, (2, 64))
    return transformers.MistralForCausalLM(config), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("build", [swin, whisper, mistral], ids=lambda build: build.__name__)
def test_a_hugging_face_model_called_by_name_trains_with_a_plan_below_store_all(build):
    torch.manual_seed(0)
    model, batch = build()
    # (85% of the held step: whisper-tiny's set-to-none step peaks at its backward's end, on gradients, below that)
    planned = apply(model, budget="85%", example_inputs=batch, device="cpu", time_limit=TIME_LIMIT, gradients="held")
    step = planned.planned
    assert step.plan.schedule.recomputed_nodes() and step.simulation.peak_bytes <= step.plan.budget_bytes
    loss, memory = planned.measure(**batch)
    assert memory.peak_live_bytes == step.simulation.activation_peak_bytes  # to the byte
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(**batch).loss
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
