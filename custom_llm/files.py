"""The files the stages hand each other: model_config.pth, the trained weights and training
checkpoints. Everything is loaded weights-only (no code in a file ever runs) and saved atomically,
and every way a file can be wrong is one line saying what to do."""

import os
import warnings

import torch

from custom_llm.architectures import architecture_of, sequence_length, train_windows
from custom_llm.atomic import atomic_path
from custom_llm.errors import UserError, cannot_read
from custom_llm.corpus import changed_files, spec_text
from custom_llm.model import CONFIG_KEYS, LanguageModel, build_model
from custom_llm.tokenizer import tokenizer_hash


def load_weights_only(path: str, fix: str):
    """torch.load that never runs code from the file: anything but tensors and plain data is
    refused (weights_only=True), as is a damaged file, each with one line saying what to do; a
    file that cannot be read at all (permissions, a folder, an I/O error) says so."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing; the refusal is the message
            return torch.load(path, weights_only=True, map_location="cpu")
    except OSError as err:   # not read at all: say why, not that the file is damaged
        raise cannot_read(path, err) from None
    except Exception as err:
        reason = "it holds objects other than weights, refused for safety" \
            if "weights_only" in str(err) or "Unsupported global" in str(err) else "truncated or damaged"
        raise UserError(f"{path} cannot be loaded ({reason}): {fix}") from None


# ------------------------------------------------------------------------------ config

def load_config(path="model_config.pth") -> dict:
    """model_config.pth as a dict, with a one-line error for every way it can be wrong."""
    config = load_weights_only(path, "create it with `python llm_model.py`")
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        raise UserError(f"{path} is not a model config (expected keys {', '.join(CONFIG_KEYS)}): "
                        "recreate it with `python llm_model.py`")
    return config


def save_config(config: dict, path="model_config.pth") -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(config), tmp)


def check_tokenizer_fits(tokenizer, config: dict, tokenizer_path: str, config_path: str) -> None:
    """The tokenizer and the config must come from the same training run."""
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise UserError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but {config_path} says "
                        f"vocab_size {config['vocab_size']}: they come from different training runs; "
                        "retrain with `python train_llm.py`")


# ----------------------------------------------------------------------------- weights

def load_trained_model(model_path: str, config: dict) -> LanguageModel:
    """The trained model in eval mode, or a one-line error naming what does not fit."""
    state = load_weights_only(model_path, "train a model with `python train_llm.py`")
    model = build_model(config)
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{model_path} is not a model state_dict: retrain with `python train_llm.py`")
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{model_path} lacks tensor {name}: it was trained for another model config")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{model_path} does not match the config: tensor {name} has shape "
                            f"{tuple(state[name].shape)}, the config needs {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{model_path} has tensors this model does not ({', '.join(unexpected[:3])}): "
                        "it was trained for another model config")
    model.load_state_dict(state)
    return model.eval()


def save_weights(model, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


# ------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer, generator, state):
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "torch_rng": torch.get_rng_state(), "numpy_rng": generator.bit_generator.state, **state}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume from: start a run without --resume", 2)
    return load_weights_only(path, "start a new run without --resume")


def check_resume(checkpoint, config, tokenizer, dataset):
    """A clear error naming what differs between the checkpoint and this run. The text is
    compared by content: the same files with the same content resume, wherever the run's folder
    and its documents now are (and whatever key an older checkpoint gave them)."""
    architectures = architecture_of(checkpoint["config"]).NAME, architecture_of(config).NAME
    if architectures[0] != architectures[1]:
        raise UserError(f"cannot resume: the checkpoint is of a {architectures[0]} model, the config describes "
                        f"a {architectures[1]} model")
    for key in CONFIG_KEYS:
        if checkpoint["config"].get(key) != config.get(key):
            raise UserError(f"cannot resume: model config differs from the checkpoint's ({key} is "
                            f"{config.get(key)}, the checkpoint has {checkpoint['config'].get(key)})")
    lengths = sequence_length(checkpoint["config"]), sequence_length(config)
    if lengths[0] != lengths[1]:
        raise UserError(f"cannot resume: the checkpoint trained on rows of {lengths[0]} tokens, the config asks "
                        f"for {lengths[1]} (train_windows {train_windows(config)})")
    if checkpoint["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise UserError("cannot resume: tokenizer.json differs from the one the checkpoint was trained with")
    if checkpoint["text_hash"] != dataset.text_hash:
        changed = None if dataset.corpus.single else changed_files(checkpoint.get("manifest"), dataset.corpus.manifest())
        if changed != "":
            raise UserError(f"cannot resume: the text {spec_text(checkpoint['plan']['dataset_path'])} changed since "
                            f"the checkpoint ({changed or 'its content hash differs'}); start a new run or use "
                            "--init_from")
