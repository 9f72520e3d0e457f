"""Loading the model and tokenizer from a local folder, and the chat template.

The real VibeThinker-1.5B weights and the random-weight demo model go through
exactly this code. Nothing here talks to the Hugging Face hub.
"""

import contextlib
import copy
import ctypes
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Set before transformers is imported: never reach for the hub, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from service.inference import artifact, int8kernel, kvcache, numerics  # noqa: E402
from service.inference.generation import LEAST_PENALTY  # noqa: E402
from service.inference.thinking import Tags  # noqa: E402

hf_logging.disable_progress_bar()
log = logging.getLogger("vibethinker.model")
PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
TEMPLATE_PIECES = 1024  # template pieces whose ids are kept (a conversation's roles make its pieces)

# The sampling parameters a model folder's generation_config.json may set, and the values a sampler can take:
# a value outside them is ignored (with a warning) rather than served.
SAMPLING = {"temperature": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
            "top_k": lambda v: v == int(v) and v >= -1, "min_p": lambda v: 0 <= v <= 1,
            "repetition_penalty": lambda v: v >= LEAST_PENALTY}


def _byte_level_alphabet():
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte (printable bytes themselves, the
    others shifted past 255), as byte-level tokenizers (Qwen2's) write their tokens."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = dict(zip(kept, map(chr, kept))), 0
    for byte in range(256):
        if byte not in chars:
            chars[byte], shifted = chr(256 + shifted), shifted + 1
    return {char: byte for byte, char in chars.items()}


BYTE_OF = _byte_level_alphabet()

PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


class PromptError(ValueError):
    """A conversation this model's chat template cannot encode safely."""


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer, and the ids that end a reply."""

    model: object
    tokenizer: object
    eos_ids: frozenset
    pad_id: int
    load_seconds: float
    context_length: int
    backend: object = None  # the Rust tokenizer, when decoding through it gives the same text
    mode: str = "float32"  # the numeric mode: float32, bfloat16, or int8
    float32_prefill: bool = False  # bfloat16 weights, upcast for prefill (a CPU without bf16 units)
    device: str = "cpu"  # where the weights are and every step runs: cpu or cuda
    opens_reasoning: bool = False  # the chat template opens the thinking after its generation prompt
    forced: tuple = ()  # tests only (settings.forced_output): the tokens every reply is made of, end token last
    tags: Tags = Tags("", "")  # how it marks its thinking (service.inference.thinking); none: it does not think
    closing: tuple = ()  # the tokens that end a thinking early: a short sentence, the end tag, a blank line
    closing_thinking: int = 0  # how many of them are the thinking's (up to its end tag)
    int8_kernel: str = None  # int8 mode only: the kernel its linear layers run on, own or fbgemm (int8kernel.choose)
    layout: object = None  # the KV cache's shape and dtype (service.inference.kvcache.Layout)
    layer_types: tuple = ("full_attention",)  # the attention kinds of the model's layers (its masks' keys)
    defaults: dict = field(default_factory=dict)  # the sampling values its generation_config.json sets (SAMPLING)

    def __post_init__(self):
        # The tokenizer has one owner per side. A fast tokenizer is one Rust object that refuses a mutable
        # borrow while another thread holds it ("RuntimeError: Already borrowed"), so request threads
        # encode through `tokenizer` one at a time, and the engine thread decodes through its own copy.
        self._encoding = threading.Lock()
        self._template_ids = {}  # the template's own pieces (its text between messages: by roles) -> their ids
        self.decoder = copy.deepcopy(self.tokenizer)
        backend = getattr(self.decoder, "backend_tokenizer", None)
        if backend is not None and not getattr(self.decoder, "clean_up_tokenization_spaces", True):
            self.backend = backend  # 3x faster than tokenizer.decode; the engine decodes every row each step

    def encode_chat(self, messages):
        """Token ids of the chat-templated conversation, ready for the assistant's turn.

        Only the template writes control tokens. The template is rendered around placeholders; its own
        text is tokenized as usual, and each message's text with special tokens split, so a client's
        `<|im_end|><|im_start|>system` stays plain text and can never open a turn. PromptError when the
        template changes a message's text (then its pieces cannot be told apart).
        """
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        with self._encoding:
            rendered = self.tokenizer.apply_chat_template(
                [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True,
                tokenize=False)
            pieces = PLACEHOLDER.split(rendered)  # template, index, template, index, ..., template
            if pieces[1::2] != [str(i) for i in range(len(messages))]:
                raise PromptError("the chat template does not keep each message's text as it is")
            ids = []
            for i, piece in enumerate(pieces):
                if i % 2:
                    ids += self._ids(messages[int(piece)]["content"], split_special_tokens=True)
                elif piece:
                    ids += self._template_piece(piece)
        return ids

    def _template_piece(self, piece):
        """The ids of a piece of the template's own text, tokenized once: the pieces depend only on the
        messages' roles, so a handful of them make every prompt (bounded all the same)."""
        ids = self._template_ids.get(piece)
        if ids is None:
            ids = self._ids(piece)
            if len(self._template_ids) < TEMPLATE_PIECES:
                self._template_ids[piece] = ids
        return list(ids)

    def _ids(self, text, split_special_tokens=False):
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]

    def prefill_mode(self):
        """The context a prefill forward runs in."""
        return numerics.float32_matmuls(self.model) if self.float32_prefill else contextlib.nullcontext()

    def decode_token(self, token):
        """Text of one token, a special one included (a log probability's `token`); a token that is part of a
        character reads as U+FFFD, as in other servers' log probabilities."""
        return self.decode([token], special=True)

    def token_bytes(self, token):
        """The bytes of one token: a byte-level BPE token's own (part of a character included), else its text's."""
        piece = self.decoder.convert_ids_to_tokens(token)
        if self._byte_level and piece is not None and piece not in self.decoder.all_special_tokens:
            try:
                return bytes(BYTE_OF[char] for char in piece)
            except KeyError:  # not a byte-level form after all (an added token)
                pass
        return self.decode_token(token).encode()

    @property
    def _byte_level(self):
        backend = self.backend or getattr(self.decoder, "backend_tokenizer", None)
        return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def decode(self, ids, special=False):
        """Text of generated ids, special tokens dropped unless `special` (the engine thread's copy of the
        tokenizer)."""
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=not special)
        return self.decoder.decode(ids, skip_special_tokens=not special)


class DeviceError(RuntimeError):
    """The device asked for cannot run this model; the message says what to change."""


def resolve_device(setting, quantization="none", cuda_available=None):
    """The device the `device` setting (auto, cpu, cuda) means here; DeviceError when it cannot be had.

    auto is cuda when torch sees a GPU, except for int8 (CPU kernels only), which stays on the CPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and (not cuda_available or quantization == "int8")):
        return "cpu"
    if quantization == "int8":
        raise DeviceError("quantization int8 runs on the CPU only: set quantization none or device cpu")
    if not cuda_available:
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise DeviceError(f"device cuda was asked for, but torch {torch.__version__} ({build}) sees no GPU: "
                          "install the CUDA build of torch (Ansible: app_torch_variant: cuda) and check that "
                          "the service may open /dev/nvidia*, or set device cpu")
    return "cuda"


def load(path, dtype="float32", quantization="none", prefill_float32="auto", device="cpu", reasoning_start="",
         forced_output=None, kv_dtype="auto", reasoning_end="", closing="", int8_kernel="auto"):
    """Load model and tokenizer once from a local folder; weights are memory-mapped.

    With quantization "int8", a plain checkpoint loads in its own dtype (a
    bfloat16 one stays mapped, not copied) and becomes int8 one decoder layer
    at a time; a folder written by `vibethinker-admin model convert` loads as
    it is. Such a folder only loads with the quantization it was converted to.
    `device` is a setting (auto, cpu, cuda; see resolve_device); on cuda the
    weights are copied to the GPU in `dtype`; attention goes through the engine's own
    (service.inference.kvcache), transformers' SDPA for anything else. `reasoning_start` is the tag whose
    presence after the template's generation prompt means the template opens the thinking itself;
    `reasoning_end` the tag that closes it, and `closing` the sentence fed in before it to end a thinking
    early (service.inference.thinking). `kv_dtype` is what the KV cache is stored in (service.inference.kvcache.cache_dtype).
    `int8_kernel` (auto, own, fbgemm) picks the int8 mode's kernel (service.inference.int8kernel.choose).
    """
    started = time.monotonic()
    device = resolve_device(device, quantization)
    converted = artifact.quantization_of(path)
    if converted is not None and converted != quantization:
        raise ValueError(f"{path} is a pre-converted {converted} model: set quantization = {converted} "
                         f"(it is {quantization}), or point model_path at the original checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    int8 = quantization == "int8"
    kernel = int8kernel.choose(int8_kernel) if int8 else None
    if converted:
        model = artifact.load(path, kernel)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if int8 else getattr(torch, dtype), low_cpu_mem_usage=True, local_files_only=True,
        )
        model.eval()
        if int8:
            numerics.quantize_int8(model, kernel)
        elif device == "cuda":
            model.to(device)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    loaded = LoadedModel(model, tokenizer, frozenset(eos_ids), pad_id, time.monotonic() - started, int(context),
                         mode="int8" if int8 else dtype, device=device, int8_kernel=kernel,
                         float32_prefill=not int8 and device == "cpu"
                         and numerics.wants_float32_prefill(prefill_float32, dtype))
    _give_back_free_memory()
    config = model.config
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError(f"{path}: sliding-window attention is not supported (config use_sliding_window)")
    kvcache.install(model)
    loaded.layout = kvcache.Layout.of(config, kvcache.cache_dtype(kv_dtype, loaded.mode))
    loaded.layer_types = tuple(sorted(set(getattr(config, "layer_types", None) or ["full_attention"])))
    loaded.defaults = sampling_defaults(path)
    loaded.encode_chat(PROBE)  # a chat template the service cannot encode safely fails the load, not each request
    loaded.opens_reasoning = opens_reasoning(tokenizer, reasoning_start)
    if reasoning_end:
        loaded.tags = Tags(reasoning_start, reasoning_end, loaded.opens_reasoning or not reasoning_start)
        thinking = loaded._ids(closing + reasoning_end)
        loaded.closing, loaded.closing_thinking = (*thinking, *loaded._ids("\n\n")), len(thinking)
    if forced_output:
        loaded.forced = (*tokenizer(forced_output, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    return loaded


def sampling_defaults(path):
    """The sampling parameters (SAMPLING) the folder's generation_config.json itself sets.

    Read from the file, not from transformers' GenerationConfig: transformers 4 fills unset keys with its
    library defaults (top_k 50, temperature 1.0) and its to_diff_dict drops a value set equal to one of them,
    so neither tells what the model's authors chose. `do_sample` is not read (as vLLM does not)."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        values = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        log.warning("%s is not readable JSON (%s): the model's sampling defaults are not used", file, exc)
        return {}
    defaults = {}
    for name, valid in SAMPLING.items():
        value = values.get(name) if isinstance(values, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not valid(value):
            log.warning("%s: %s = %r is not a value a sampler takes: ignored", file, name, value)
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)
    return defaults


def _give_back_free_memory():
    """Return the heap the load freed to the system (glibc keeps it otherwise: about 0.3 GiB at full size)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def opens_reasoning(tokenizer, start):
    """True when the chat template, rendered for a probe conversation, ends its generation prompt inside the
    thinking: `start` after the last user message's text."""
    if not start:
        return False
    rendered = tokenizer.apply_chat_template(PROBE[:2], add_generation_prompt=True, tokenize=False)
    closed = tokenizer.apply_chat_template(PROBE[:2], add_generation_prompt=False, tokenize=False)
    return start in rendered[len(closed):] if rendered.startswith(closed) else rendered.rstrip().endswith(start)


def chat_messages(question, system_prompt):
    """The conversation for one question; an empty system prompt means none."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return messages
