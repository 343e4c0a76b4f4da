"""Exports of a trained model: a Hugging Face folder and a GGUF file, and FORMATS, the list
convert_to_gguf.py writes and checks (each with its writer and its reader).

What is the same for every architecture lives here: the tokenizer (and a chat model's template)
in both exports, the GGUF's header, quantization. What an architecture's weights are called and how
they are laid out in each export is its own module's (gpt2.py, through architectures.py). The
GGUF is written with the `gguf` package (no llama.cpp checkout) and quantized with llama.cpp's own
quantizer through llama-cpp-python.
"""

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from custom_llm import gguf_keys, isolated
from custom_llm.architectures import architecture_of
from custom_llm.atomic import atomic_path
from custom_llm.chat_format import end_ids, template_of_config
from custom_llm.errors import UserError
from custom_llm.runtime import llama_log
from custom_llm.tokenizer import END_OF_TEXT, vocab_and_merges

# ------------------------------------------------------------------------ Hugging Face

def write_hf_folder(model, tokenizer, folder: str) -> None:
    """Write the architecture's transformers model + tokenizer into folder, which transformers
    then loads offline; into folder as it is (not atomically: convert_to_gguf.py writes it into
    its staging area)."""
    from transformers import PreTrainedTokenizerFast
    _quiet_transformers()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    hf_model = architecture_of(model.config).hf_model(model, eot)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT,
                                           eos_token=END_OF_TEXT, unk_token=None)
    template = template_of_config(model.config, tokenizer)
    if template:   # apply_chat_template formats as training did; generate() ends a turn
        hf_tokenizer.chat_template = template.jinja
        hf_model.generation_config.eos_token_id = sorted(end_ids(tokenizer, template))
    hf_model.save_pretrained(folder, safe_serialization=True)
    hf_tokenizer.save_pretrained(folder)


def _quiet_transformers():
    """No progress bars from transformers: the stage prints one line per file itself."""
    from transformers.utils import logging
    logging.disable_progress_bar()


# ------------------------------------------------------------------------------ GGUF

def write_gguf_atomic(model, tokenizer, path: str, dtype: str = "F16", name: str = "custom-llm", **options) -> None:
    """write_gguf, atomically: path is the old file or the whole new one, never half of one."""
    with atomic_path(path) as tmp:
        write_gguf(model, tokenizer, tmp, dtype, name, **options)


def write_gguf(model, tokenizer, path: str, dtype: str = "F16", name: str = "custom-llm", **options) -> None:
    """Write the model as an unquantized GGUF of its architecture (dtype F32 or F16 for the
    matrices; vectors stay F32, as llama.cpp expects), to path as it is (not atomically).
    options: the architecture's own (gpt2.add_gguf_model: context_length, position_rule)."""
    import gguf

    architecture = architecture_of(model.config)
    writer = gguf.GGUFWriter(path, arch=architecture.GGUF_ARCH)
    writer.add_name(name)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}[dtype])
    add_gguf_tokenizer(writer, tokenizer, template_of_config(model.config, tokenizer))
    architecture.add_gguf_model(writer, model, {"F32": np.float32, "F16": np.float16}[dtype], **options)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_gguf_tokenizer(writer, tokenizer, template) -> None:
    """The byte-level BPE (tokenizer.py) as llama.cpp's gpt2 tokenizer, and a chat model's
    template and end of turn."""
    import gguf
    tokens, merges, eot = vocab_and_merges(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    # Special tokens are control tokens: llama.cpp then reads them as one id only where a template
    # (or a caller asking for special tokens) writes them, never in ordinary text.
    special = {tokenizer.token_to_id(t) for t in (template.special_tokens if template else [END_OF_TEXT])} - {None}
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template:   # the template front ends format with; a turn's end stops generation
        writer.add_string(gguf_keys.CHAT_TEMPLATE, template.jinja)
        writer.add_uint32(gguf_keys.END_OF_TURN, tokenizer.token_to_id(template.end_of_turn))


# ------------------------------------------------------------------------ quantization

# Types left out: llama.cpp refuses to make these without an importance matrix, or its
# quantizer (llama-cpp-python 0.3.36) fails on them, or the gguf reader cannot read the result.
UNSUPPORTED = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S",
               "NVFP4", "Q1_0", "Q2_0", "GUIDED"}


def quant_types() -> dict:
    """Every type llama.cpp's quantizer offers, by its usual name -> llama_ftype value."""
    import llama_cpp
    types = {}
    for attr in dir(llama_cpp):
        match = re.fullmatch(r"LLAMA_FTYPE_(?:MOSTLY|ALL)_(\w+)", attr)
        if match and match.group(1) not in UNSUPPORTED:
            types[match.group(1)] = getattr(llama_cpp, attr)
    return types


def check_quant_type(name: str) -> str:
    types = quant_types()
    upper = name.upper()
    if upper not in types:
        raise UserError(f"unknown --quant_type {name!r}; valid types: {', '.join(sorted(types))}",
                        exit_code=2)
    return upper


def quantize_atomic(source: str, destination: str, quant_type: str, llama_cpp_path: str = None) -> dict:
    """quantize, atomically. Returns fallback_tensors of the result."""
    with atomic_path(destination) as tmp:
        quantize(source, tmp, quant_type, llama_cpp_path)
    return fallback_tensors(destination, quant_type)


def quantize(source: str, path: str, quant_type: str, llama_cpp_path: str = None) -> None:
    """Quantize a GGUF with llama.cpp's quantizer, to path as it is (not atomically)."""
    if llama_cpp_path:
        return _quantize_with_binary(source, path, quant_type, llama_cpp_path)
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant_type]
    params.nthread = os.cpu_count() or 1
    mark = llama_log.mark()
    status = llama_cpp.llama_model_quantize(source.encode(), path.encode(), params)
    if status != 0:
        said = [line.strip() for line in llama_log.since(mark) if line.strip()][-1:] or ["no message"]
        raise OSError(f"llama.cpp could not quantize to {quant_type} (status {status}): {said[0]}")


def fallback_tensors(path: str, quant_type: str) -> dict:
    """{name: type} of the weight matrices in the GGUF at path that could not get quant_type
    because their rows do not divide into its blocks (32 values, 256 for K-quants), so llama.cpp
    gave them another type. Read from the file's own tensor types and shapes."""
    import gguf
    block = block_size(quant_type)
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors
            if len(t.shape) >= 2 and int(t.shape[0]) % block and t.tensor_type.name != "F32"}


# The ggml type that carries a llama.cpp quantization mix where the name does not say it.
MIX_TYPES = {"IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S", "MXFP4_MOE": "MXFP4"}


def block_size(quant_type: str) -> int:
    """Values per block of quant_type's main type (1 for F32, F16, BF16)."""
    import gguf
    name = MIX_TYPES.get(quant_type) or re.sub(r"(_K)_[SML]$", r"\1", quant_type)
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]


def _quantize_with_binary(source, destination, quant_type, llama_cpp_path):
    candidates = [os.path.join(llama_cpp_path, *parts) for parts in
                  (("llama-quantize",), ("build", "bin", "llama-quantize"), ("bin", "llama-quantize"))]
    binary = next((c for c in candidates if os.access(c, os.X_OK)), None)
    if binary is None:
        raise UserError(f"no llama-quantize found in {llama_cpp_path} (looked in "
                        f"{', '.join(candidates)}); build llama.cpp there or leave out --llama_cpp_path")
    result = subprocess.run([binary, source, destination, quant_type], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise OSError(f"{binary} failed on {quant_type}: {' '.join(tail)}")


def tensor_types(path: str) -> dict:
    """{tensor name: type name} of a GGUF, and its bits per weight over all tensors."""
    import gguf
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    return types, 8 * n_bytes / max(1, n_weights)


# ------------------------------------------------------------------------------ formats

class HFExport:
    """A Hugging Face export read back through transformers, as its users will read it."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        _quiet_transformers()
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def tokenize(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, tokens) -> np.ndarray:
        import torch
        with torch.no_grad():
            return self.model(torch.tensor([list(tokens)])).logits[0].float().numpy()

    def chat(self, messages, max_tokens: int):
        """(the prompt's ids as apply_chat_template formats it, the greedy answer's ids: up to and
        with the end-of-turn token where it ends)."""
        import torch
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return ids, out[0, len(ids):].tolist()


@dataclass(frozen=True)
class Format:
    """An export that convert_to_gguf.py writes, then reads back and checks against the PyTorch
    model (checks.py). A new format is one more entry in FORMATS."""
    flag: str                   # convert_to_gguf.py's flag naming where it goes
    default: str
    description: str
    write: Callable             # (model, tokenizer, path): writes there as it is; the caller makes it atomic
    read_back: Callable         # (path, strings, windows) -> (each string's ids, each window's (len, vocab) logits)
    tolerance: float            # largest relative logit error accepted (max |difference| / max |logit|)
    bits_per_weight: Optional[Callable] = None   # path -> bits per weight, where the format says
    # (path, conversations, max tokens of each answer) -> [(prompt ids, greedy answer ids)], as the
    # format's own chat front end formats and answers them (a chat model's check)
    chat_read_back: Optional[Callable] = None
    folder: bool = False        # the export is a folder, not a file
    # (path, prompt ids, max tokens) -> the greedy continuation's ids, through the format's own
    # generation (a windowed model's check far past the block)
    greedy_read_back: Optional[Callable] = None


def _write_f16_gguf(model, tokenizer, path):
    write_gguf(model, tokenizer, path, "F16")


def _read_back_hf(path, strings, windows):
    export = HFExport(path)
    return [export.tokenize(s) for s in strings], [export.logits(w) for w in windows]


def _chat_hf(path, conversations, max_tokens):
    export = HFExport(path)
    return [export.chat(messages, n) for messages, n in zip(conversations, max_tokens)]


# llama.cpp computes some steps in half precision, so even an F32 GGUF is not bit-exact. A GGUF is
# read back in a child process (isolated.py): llama.cpp's crashes there are answers.
HF = Format("output_dir", "hf_model", "Hugging Face model + tokenizer", write_hf_folder, _read_back_hf,
            2e-3, chat_read_back=_chat_hf, folder=True)
GGUF = Format("gguf_output", "model.gguf", "F16", _write_f16_gguf, isolated.read_back, 1e-2,
              bits_per_weight=lambda path: tensor_types(path)[1], chat_read_back=isolated.chat,
              greedy_read_back=isolated.greedy)
FORMATS = [HF, GGUF]
