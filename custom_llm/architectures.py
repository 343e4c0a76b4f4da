"""The architectures a model can have: one module each, holding its graph, its Hugging Face form
and its GGUF form. A config names its architecture (config["architecture"]); configs saved before
there was a choice are GPT-2's. A new architecture is one more module here, and its GGUF_ARCH in
gguf_keys.READABLE_ARCHITECTURES (inference imports no torch, so it cannot ask the modules).

Each module provides:
    NAME, GGUF_ARCH                    its name in the config, and llama.cpp's
    Model(config)                      a model.LanguageModel
    count_parameters(config)           without building it
    hf_model(model, end_of_text_id)    a transformers model holding its weights
    add_gguf_model(writer, model, matrix_type, **options)   its GGUF metadata and tensors
"""

from custom_llm import gpt2

ARCHITECTURES = {module.NAME: module for module in [gpt2]}
DEFAULT = gpt2.NAME


def architecture_of(config: dict):
    """The module of the architecture the config names."""
    name = config.get("architecture", gpt2.NAME)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
