"""A local Hugging Face GPT-2-family folder (gpt2, distilgpt2, anything saved with save_pretrained)
as a starting point for train_llm.py --init_from: its config, its tokenizer in our format, its
weights in our GPT-2 model (the weight mapping is gpt2.py's).

Nothing is ever downloaded: every read is local_files_only.
"""

import json
import os

from custom_llm import gpt2
from custom_llm.errors import UserError, cannot_read
from custom_llm.gpt2 import LAYER_NORM_EPS, state_dict_from_hf
from custom_llm.tokenizer import END_OF_TEXT, build_bpe_tokenizer

# ------------------------------------------------------------------ a local GPT-2 folder

DOWNLOAD_HINT = ("download it first while online, e.g. `huggingface-cli download {name} --include '*.json' "
                 "'*.txt' '*.safetensors' --local-dir {name}` (README: Start from GPT-2)")


def check_starting_point(path: str) -> None:
    """--init_from must be trained weights (a .pth file) or a local GPT-2 folder; a hub name
    such as gpt2 is neither until it is downloaded."""
    if os.path.exists(path):
        return
    if path.endswith((".pth", ".pt")):
        raise UserError(f"{path} not found: train a model with `python train_llm.py`, or give a GPT-2 folder", 2)
    raise UserError(f"--init_from {path}: no such file or folder here, and nothing is downloaded at run time: "
                    + DOWNLOAD_HINT.format(name=path), 2)


def read_gpt2_config(folder: str) -> dict:
    """The folder's config.json, checked to be a graph our model is (GPT-2's), as our config keys:
    block_size = n_positions, and the folder's own sizes."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json: give a Hugging Face model folder (saved with "
                        "save_pretrained) or trained_model.pth", 2)
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as err:
        raise cannot_read(path, err) from None
    except ValueError:
        raise UserError(f"{path} is not valid JSON: download the model again") from None
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{folder} holds a {hf.get('model_type', 'unknown')!r} model: only GPT-2-family "
                        "models (GPT2LMHeadModel, e.g. gpt2, distilgpt2) can be a starting point", 2)
    n_embd = hf.get("n_embd", 768)
    # Each: (what the folder says, what our graph computes, the setting's name).
    unsupported = [
        (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), "activation_function",
         "GELU with the tanh approximation (gelu_new)"),
        (hf.get("layer_norm_epsilon", 1e-5) == LAYER_NORM_EPS, "layer_norm_epsilon", f"{LAYER_NORM_EPS:g}"),
        (hf.get("n_inner") in (None, 4 * n_embd), "n_inner", f"4 x n_embd ({4 * n_embd})"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights", "true"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx", "false"),
        (not hf.get("add_cross_attention", False), "add_cross_attention", "false"),
    ]
    for fits, key, ours in unsupported:
        if not fits:
            raise UserError(f"{folder}: {key} is {hf.get(key)!r}, but this project's model (GPT-2's graph, which "
                            f"llama.cpp runs) has {ours}: this model cannot be a starting point", 2)
    config = {"vocab_size": hf.get("vocab_size", 50257), "n_embd": n_embd, "n_head": hf.get("n_head", 12),
              "n_layer": hf.get("n_layer", 12), "block_size": hf.get("n_positions", 1024)}
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: {key} is {value!r}, not a positive whole number: the folder is damaged; "
                            "download the model again", 2)
    if config["n_embd"] % config["n_head"]:
        raise UserError(f"{path}: n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}, so "
                        "GPT-2's attention cannot split it into heads: the folder is damaged; download it again", 2)
    return config


def load_gpt2_tokenizer(folder: str):
    """The folder's byte-level BPE as a tokenizer of ours (tokenizer.py's shape: the same vocab and
    merges, ByteLevel pre-tokenizer and decoder, <|endoftext|> special), from its tokenizer.json or,
    failing that, from vocab.json + merges.txt."""
    tokenizer_json, vocab_json, merges_txt = (os.path.join(folder, name) for name in
                                              ("tokenizer.json", "vocab.json", "merges.txt"))
    try:
        if os.path.isfile(tokenizer_json):
            with open(tokenizer_json, encoding="utf-8") as f:
                model = json.load(f)["model"]
            if model.get("type") != "BPE":
                raise UserError(f"{tokenizer_json} is a {model.get('type')} tokenizer, not GPT-2's byte-level BPE", 2)
            vocab, merges = model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                             for m in model["merges"]]
        elif os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
            with open(vocab_json, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_txt, encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f
                          if line.strip() and not line.startswith("#version")]
        else:
            raise UserError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): "
                            "save the tokenizer beside the model (tokenizer.save_pretrained)", 2)
    except OSError as err:
        raise cannot_read(folder, err) from None
    except (ValueError, KeyError):
        raise UserError(f"{folder}'s tokenizer files cannot be read as a BPE tokenizer: download it again") from None
    if END_OF_TEXT not in vocab:
        raise UserError(f"{folder}'s tokenizer has no {END_OF_TEXT} token, which this project's models end text "
                        "with: only GPT-2-family tokenizers are supported", 2)
    return build_bpe_tokenizer(vocab, merges)


def read_gpt2_folder(folder: str):
    """(our config keys from the folder's config, its tokenizer in our format), checked to belong
    together."""
    config, tokenizer = read_gpt2_config(folder), load_gpt2_tokenizer(folder)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise UserError(f"{folder}: the model has vocab_size {config['vocab_size']} but its tokenizer "
                        f"{tokenizer.get_vocab_size()} tokens: a padded or extended vocabulary is not supported", 2)
    return config, tokenizer


def load_gpt2_model(folder: str, config: dict) -> gpt2.Model:
    """The folder's GPT2LMHeadModel weights in our model, in eval mode."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()  # "some weights are tied": expected, and handled
    logging.disable_progress_bar()
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True)
    except Exception as err:   # missing (OSError), truncated (safetensors), of another shape (RuntimeError)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{folder} holds no readable GPT-2 weights of its config's shape ({reason}): "
                        + DOWNLOAD_HINT.format(name=os.path.basename(os.path.normpath(folder)))) from None
    model = gpt2.Model(config)
    missing, unexpected = model.load_state_dict(state_dict_from_hf(hf_model.state_dict()), strict=False)
    if missing or unexpected:
        raise UserError(f"{folder}'s weights do not map onto GPT-2's graph (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.eval()
