"""The demo model: tokenizer ids match what the service uses, tiny is tiny, the 1.5B preset is real-sized."""

import json

import pytest

SAMPLES = ["Hello wörld, what is 12+34?", "naïve café \n\n  def f(x): return x", "日本語 ✓ 🙂", "  spaces\tand\ttabs  "]


@pytest.mark.parametrize("text", SAMPLES)
def test_service_tokenizer_gives_the_trained_ids(tiny_model, reference, text):
    from tokenizers import Tokenizer

    trained = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert reference.tokenizer.encode(text, add_special_tokens=False) == trained.encode(text).ids
    assert reference.decode(reference.tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_qwen_style(reference):
    ids = reference.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert reference.tokenizer.decode(ids) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                                                "<|im_start|>assistant\n"
    assert reference.tokenizer.convert_tokens_to_ids("<|im_end|>") in reference.eos_ids


def test_tiny_is_a_few_megabytes_and_says_it_is_a_demo(tiny_model):
    size = sum(path.stat().st_size for path in tiny_model.iterdir())
    assert size < 5 * 2**20
    assert "gibberish" in (tiny_model / "DEMO_MODEL.txt").read_text()
    assert json.loads((tiny_model / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"


def test_greedy_output_depends_on_the_prompt(reference):
    from tests.support.reference import greedy

    outputs = {greedy(reference, [{"role": "user", "content": q}], 12)[0] for q in ["a", "b", "c", "d", "e"]}
    assert len(outputs) == 5


def test_vibethinker_preset_has_the_real_shape(reference):
    import torch
    from transformers import Qwen2ForCausalLM

    from service.demo_model import make_config

    config, _, dtype = make_config("vibethinker-1.5b", reference.tokenizer)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1536, 8960, 28)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (12, 2, 151936)
    assert config.tie_word_embeddings and dtype == torch.bfloat16
    assert 1.54e9 < params < 1.55e9
