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
    TRAIN_WINDOWS                      windows of block_size a training row holds by default
                                       (1: the model reads at most block_size tokens)
    CHECK_WINDOWS                      windows of the export checks' long pass (1: the block)
    ACTIVATION_BYTES                   {bfloat16: bytes} training keeps per token, layer and n_embd
                                       (memory.py)
"""

from custom_llm import gpt2, windowed

ARCHITECTURES = {module.NAME: module for module in [gpt2, windowed]}
# What llm_model.py makes unless told: the model that is the same at any length in every reader
# (docs/windowed.md). Configs without an "architecture" key stay GPT-2's (architecture_of).
DEFAULT = windowed.NAME


def architecture_of(config: dict):
    """The module of the architecture the config names."""
    name = config.get("architecture", gpt2.NAME)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def train_windows(config: dict) -> int:
    """Windows of block_size in one training row: the config's, else the architecture's default;
    always 1 for an architecture that reads no further than its block (GPT-2's learned positions)."""
    default = architecture_of(config).TRAIN_WINDOWS
    return 1 if default == 1 else config.get("train_windows") or default


def sequence_length(config: dict) -> int:
    """Tokens of one training row (and of one validation row, so that validation losses compare
    from run to run): block_size for GPT-2, several windows for a windowed model. The data, the
    step plan, the memory estimate and the speed line all read it here."""
    return config["block_size"] * train_windows(config)


def check_length(config: dict) -> int:
    """Tokens of the export checks' long pass: the block for GPT-2, CHECK_WINDOWS blocks for a
    model that reads past it."""
    return config["block_size"] * architecture_of(config).CHECK_WINDOWS
