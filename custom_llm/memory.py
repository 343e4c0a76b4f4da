"""How much memory training takes: estimated from the model's shape before anything is allocated,
so a model that cannot fit is refused at once and a batch that does not fit is split (training.py)."""

from custom_llm.errors import UserError
from custom_llm.architectures import architecture_of, sequence_length
from custom_llm.model import count_parameters

# The bytes the backward pass keeps per token, per layer and per unit of n_embd are each
# architecture's (its ACTIVATION_BYTES: float32, and bfloat16 autocast).
LOGIT_BYTES = 16               # per token and vocabulary entry: logits, their softmax and gradient
WORKSPACE_BYTES = 100 * 2**20  # the allocator's and the kernels' own, beyond what is counted here


def training_memory_bytes(config: dict, windows: int, bfloat16: bool = False, base_bytes: int = None) -> int:
    """Estimated peak memory (RSS) of training with `windows` rows per forward pass (each of
    architectures.sequence_length tokens: the block, or several windows of it): what the
    process already holds (its RSS now, unless base_bytes), 16 bytes per parameter (float32
    weights, gradients and up to two optimizer moments), and the activations kept for the backward
    pass, which grow with the windows run at once."""
    import psutil
    T, C, L, V = sequence_length(config), config["n_embd"], config["n_layer"], config["vocab_size"]
    base = psutil.Process().memory_info().rss if base_bytes is None else base_bytes
    per_token_layer = architecture_of(config).ACTIVATION_BYTES[bool(bfloat16)]
    activations = windows * T * (L * C * per_token_layer + V * LOGIT_BYTES)
    return base + WORKSPACE_BYTES + 16 * count_parameters(config) + activations


def check_memory(config: dict, windows: int = 1, fix: str = None) -> None:
    """Refuse, before allocating anything, a model that cannot train in this machine's memory even
    one window at a time (training splits a larger batch to fit; see train_llm.py --memory_gb).
    fix: what to do instead, where a smaller shape is not the answer (a pretrained model)."""
    import psutil
    needed = training_memory_bytes(config, windows)
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise UserError(f"this model needs about {needed / 2**30:.1f} GiB to train "
                        f"({count_parameters(config) / 1e6:,.0f}M parameters) but only "
                        f"{available / 2**30:.1f} GiB is free: "
                        + (fix or "choose fewer layers, a smaller n_embd or block_size"), 2)
