"""Build a random-weight Qwen2 model with a locally trained tokenizer.

    python -m service.demo_model OUT_DIR [--preset tiny|vibethinker-1.5b]

The Hugging Face hub is not reachable from tests or the demo, so this script
makes a model that goes through exactly the same loading code as the real
VibeThinker-1.5B weights. Its output is gibberish: the weights are random.
`tiny` is a few MB and builds in seconds; `vibethinker-1.5b` has the real
model's shape (1.54B parameters, 3.1 GB in bf16) for honest speed and memory
measurements; its chat template opens the thinking (`<think>` after the
generation prompt), so its random weights think from the first token and
never close it on their own, as a long real answer can.
"""

import argparse
import json
import sys
from pathlib import Path

# Qwen2's pre-tokenizer split pattern. transformers 5 rebuilds Qwen2Tokenizer
# with this regex whatever tokenizer.json says, so the tokenizer must be
# trained with it too or the ids used at serving time differ.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The template of a model whose generation prompt opens the thinking, as some reasoning models' do: random
# weights then think from the first token and never close it on their own, as a long real answer does.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")

PRESETS = {
    # A few MB. A large init std makes greedy output vary with the prompt,
    # so tests that compare outputs compare something.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=None,
        max_position_embeddings=8192, tie_word_embeddings=True,
        init_std=0.2, dtype="float32", opens_thinking=False,
    ),
    # Qwen2.5-Math-1.5B's shape, which VibeThinker-1.5B shares.
    "vibethinker-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=131072, tie_word_embeddings=True,
        init_std=0.02, dtype="bfloat16", opens_thinking=True,
    ),
}
TOKENIZER_VOCAB = 2048


def training_text():
    """Yield text that ships with Python: the standard library's own sources."""
    import email
    import json as json_pkg
    import logging

    for pkg in (json_pkg, email, logging):
        for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")


def template_of(preset):
    """The chat template of a preset's model."""
    return THINKING_TEMPLATE if PRESETS[preset]["opens_thinking"] else CHAT_TEMPLATE


def set_template(out_dir, template):
    """Write `template` as the chat template of the model folder `out_dir`; True if it changed."""
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") == template:
        return False
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))
    jinja = Path(out_dir) / "chat_template.jinja"  # newer transformers save it beside, and read it first
    if jinja.is_file():
        jinja.write_text(template)
    return True


def build_tokenizer(out_dir, template=CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer the way Qwen2's is built and save it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = template
    fast.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))
    set_template(out_dir, template)
    return fast


def make_config(preset, tokenizer):
    """The Qwen2Config of a preset, with the tokenizer's special ids; also the init std and dtype."""
    import torch
    from transformers import Qwen2Config

    spec = dict(PRESETS[preset])
    spec.pop("opens_thinking")
    init_std = spec.pop("init_std")
    dtype = getattr(torch, spec.pop("dtype"))
    if spec["vocab_size"] is None:
        spec["vocab_size"] = len(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        **spec, initializer_range=init_std, rms_norm_eps=1e-6,
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
        use_sliding_window=False, hidden_act="silu",
    )
    return config, init_std, dtype


def build_model(out_dir, preset, tokenizer, seed=0):
    """Create a random-weight Qwen2ForCausalLM of the preset's shape and save it."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    config, init_std, dtype = make_config(preset, tokenizer)
    pad_id, eos_id = config.pad_token_id, config.eos_token_id
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, init_std)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def build(out_dir, preset="tiny", seed=0):
    """Build the demo model folder and return its path; another `seed` gives other weights (other answers)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, template_of(preset))
    build_model(out, preset, tokenizer, seed)
    (out / "DEMO_MODEL.txt").write_text(
        f"Random-weight demo model, preset {preset!r}, seed {seed}: its output is gibberish.\n"
        "Point VIBE_MODEL_PATH at real VibeThinker-1.5B weights for real answers.\n"
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m service.demo_model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write the model into (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed: two seeds, two models that "
                        "answer differently (for trying several models)")
    args = parser.parse_args(argv)
    out = build(args.out_dir, args.preset, args.seed)
    print(f"demo model ({args.preset}, random weights, gibberish output) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
