"""The optimizers of a training run: Muon for the blocks' matrices and AdamW for the rest, stepped,
scheduled and saved as one.

Muon's Newton-Schulz orthogonalization runs in the dtype chosen for this machine.

torch.optim.Muon always orthogonalizes in bfloat16. That is right where bfloat16 matrix products
are native (AMX, recent GPUs) and very wrong elsewhere: on an AVX2 CPU the bfloat16 iteration of
a 1024x256 matrix takes 638 ms against 13.5 ms in float32, and it took half of every training
step. This subclass keeps torch's update rule, hyperparameters and state (a checkpoint of either
loads into the other) and only lets the caller pick the dtype of the iteration.
"""

import torch


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz iterations towards the nearest semi-orthogonal matrix (U V^T of the SVD, with
    singular values left roughly in [0.5, 1.5], which trains as well): the quintic iteration and
    coefficients of torch.optim.Muon, in the given dtype."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # work on the wide form: the Gram matrix x x^T is then the small one
        x = x.T
    x = x / x.norm().clamp(min=eps)
    if dtype != torch.bfloat16 and x.size(1) >= 2 * x.size(0):
        x = _iterate_on_gram(x, steps, a, b, c)
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _iterate_on_gram(x, steps, a, b, c):
    """The same iteration for a wide x (m x n, n >= 2m), carried on m x m matrices: every iterate
    is Q x for a small Q, and its Gram matrix is Q G Q^T with G = x x^T, so only Q is updated and x
    is multiplied once at the end. That is 4 m^3 multiply-adds a step against 2 m^2 n + m^3: 38%
    less work in all for the MLP matrices (n = 4m), 26% for the fused attention matrix (n = 3m),
    measured 7.4 ms -> 4.1 ms and 5.8 -> 3.9 ms in float32 on 2 Zen 5 cores. Its rounding error is
    about 10 times the plain iteration's in float32 (1e-5 of the result against 1e-6, with singular
    values spread over 8 decades), still far below bfloat16's, so it is used in float32 only."""
    gram = x @ x.T
    q = None
    for _ in range(steps):
        current = gram if q is None else q @ gram @ q.T   # the iterate's Gram matrix
        polynomial = torch.addmm(current, current, current, beta=b, alpha=c)
        if q is None:   # the first step from Q = I
            q = polynomial
            q.diagonal().add_(a)
        else:
            q = torch.addmm(q, polynomial, q, beta=a)
    return q @ x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (momentum, Nesterov, decoupled weight decay, learning-rate adjustment)
    with the orthogonalization in `orthogonalize_dtype`."""

    def __init__(self, params, orthogonalize_dtype: torch.dtype = torch.float32, **options):
        super().__init__(params, **options)
        self.orthogonalize_dtype = orthogonalize_dtype  # not in the state: a property of the machine

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_steps"], self.orthogonalize_dtype,
                                       group["ns_coefficients"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * lr_scale(group["adjust_lr_fn"], param.shape))
        return loss


def lr_scale(adjust_lr_fn, shape) -> float:
    """torch.optim.Muon's learning-rate adjustment: match_rms_adamw scales the orthogonal update
    (RMS about 1/sqrt(max dim)) to the RMS of an AdamW step, so one learning rate serves both."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, columns) ** 0.5
    if adjust_lr_fn in (None, "original"):
        return max(1.0, rows / columns) ** 0.5
    return 1.0


def make_optimizer(model, learning_rate: float, weight_decay: float, device: str, kind: str = "muon",
                   orthogonalize_dtype=torch.float32):
    """The optimizer for a training run.

    muon (the default): Muon for the weight matrices inside the transformer blocks, AdamW for the
    embeddings, the output head, biases and LayerNorms. Muon orthogonalizes each matrix's update
    (Newton-Schulz iterations); with "match_rms_adamw" its step is scaled to AdamW's size, so one
    learning rate serves both. On tinyshakespeare it reaches a given validation loss with about
    half the tokens AdamW needs (benchmarks/bench_training.py). Its orthogonalization runs in
    orthogonalize_dtype: bfloat16 only where this machine multiplies bfloat16 matrices fast.
    adamw: AdamW for everything.
    Weight decay applies to matrices only, never to biases or LayerNorms."""
    named = list(model.named_parameters())
    block_matrices = [p for name, p in named if p.dim() == 2 and name.startswith("h.")]
    other_matrices = [p for name, p in named if p.dim() == 2 and not name.startswith("h.")]
    vectors = [p for name, p in named if p.dim() < 2]

    def adamw(matrices):
        groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.99), fused=(device == "cuda"))

    if kind == "adamw":
        return Optimizers(adamw([p for _, p in named if p.dim() == 2]))  # in model order, as checkpoints
    muon = Muon(block_matrices, orthogonalize_dtype, lr=learning_rate, weight_decay=weight_decay, momentum=0.95,
                adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw(other_matrices))


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, scheduled and saved as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        saved_states = state["optimizers"] if "optimizers" in state else [state]  # an AdamW-only checkpoint
        for optimizer, saved in zip(self.optimizers, saved_states, strict=True):
            optimizer.load_state_dict(saved)
