"""`openelm train`: train a small OpenELM (layer-wise scaling, GQA, QK-norm, tied embeddings) on a
text file with MLX: a sentencepiece tokenizer trained on the same text, AdamW with warm-up and cosine
decay, gradient clipping, a progress bar, and checkpoints that `--resume` continues from exactly.

The output folder holds tokenizer.model, train_state.json (settings, step, loss history),
checkpoint/ (weights and optimizer state) and, at the end, model/ (written by the same writer as
`openelm convert`: loadable by openelm_mlx.load and mlx_lm.load) and loss_curve.png.
Data: train_data.py; checkpoints and resuming: train_checkpoint.py; the plot: train_plot.py.
"""

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from openelm_mlx import cpu_layers
from openelm_mlx.apps.train_checkpoint import CHECKPOINT, RESTART, load_checkpoint, save_checkpoint, start_run
from openelm_mlx.apps.train_data import batch_at, encode_documents, train_tokenizer, validation_windows
from openelm_mlx.apps.train_plot import plot_losses
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import read_text
from openelm_mlx.model import Model
from openelm_mlx.model_folder import write_model_folder
from openelm_mlx.options import MAX_SEED, TRAIN_RULES, check_options
from openelm_mlx.outputs import check_output, remove
from openelm_mlx.progress import announce, progress_bar, within
from openelm_mlx.tokenizer import Tokenizer
from openelm_mlx.units import size_text

# ffn widths in multiples of 64 (not corenet's 256) let small models keep their per-layer
# scaling; every width stays divisible by 64, as 4/8-bit group quantization needs.
FFN_DIVISOR = 64


@dataclass
class TrainConfig:
    """Everything that decides the result; stored in train_state.json and checked on --resume.
    The defaults are the demo model's recipe (docs/training.md)."""

    layers: int = 6
    model_dim: int = 256
    head_dim: int = 32
    vocab_size: int = 4096  # sentencepiece pieces, trained on --text
    context: int = 256  # tokens per training window, and the model's max_context_length
    batch_size: int = 16  # windows per step
    steps: int = 500
    learning_rate: float = 3e-3  # peak, after the linear warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup: Optional[int] = None  # warm-up steps; None: default_warmup(steps)
    weight_decay: float = 0.1  # AdamW's
    grad_clip: float = 1.0  # maximum global gradient norm
    seed: int = 0  # initialization and batch order

    def __post_init__(self):
        if self.warmup is None:
            self.warmup = default_warmup(self.steps)

    def check(self):
        """Every setting in its range (options.TRAIN_RULES), before a byte is written."""
        check_options(asdict(self), TRAIN_RULES)
        if self.warmup >= self.steps:
            raise OpenELMError(f"--warmup ({self.warmup}) must be smaller than --steps ({self.steps})")
        config = OpenELMConfig.layerwise(self.layers, self.model_dim, self.head_dim, ffn_dim_divisor=FFN_DIVISOR)
        # weights, gradients and AdamW's two moments, float32; the vocabulary at its largest
        needed = 16 * (config.num_parameters() + (self.vocab_size - config.vocab_size) * self.model_dim)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory:
            raise OpenELMError(
                f"a model of --layers {self.layers} --model-dim {self.model_dim} needs about {size_text(needed)} "
                f"to train, more than this machine's {size_text(memory)}: choose a smaller one"
            )

    def model_config(self, tokenizer: Tokenizer) -> OpenELMConfig:
        return OpenELMConfig.layerwise(
            self.layers,
            self.model_dim,
            self.head_dim,
            ffn_dim_divisor=FFN_DIVISOR,
            vocab_size=tokenizer.vocab_size,
            max_context_length=self.context,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
        )

    def optimizer(self) -> optim.AdamW:
        """AdamW over a linear warm-up to learning_rate (none with --warmup 0), then a cosine decay
        to its min_lr_ratio."""
        decay = optim.cosine_decay(self.learning_rate, self.steps - self.warmup, self.learning_rate * self.min_lr_ratio)
        schedule = decay
        if self.warmup:
            warmup = optim.linear_schedule(self.learning_rate / self.warmup, self.learning_rate, self.warmup)
            schedule = optim.join_schedules([warmup, decay], [self.warmup])
        return optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=self.weight_decay)


def default_warmup(steps) -> int:
    """The demo recipe's 40 warm-up steps of 500, and a tenth of a shorter run (`--steps 20`: 2),
    so that the warm-up never takes the whole run."""
    return min(40, steps // 10) if type(steps) is int else 40  # a bad --steps is named by check()


# On a CPU, a step of the demo recipe (16 windows of 256 tokens) took 30-55 s as one evaluation with
# the mlx[cpu] wheel's reference BLAS (2-core x86-64): Ctrl-C waited for it and the bar stood still.
# There the gradient is summed window by window, each evaluated on its own (mlx-lm's trainer
# accumulates the same way, tuner/trainer.py:247-260); a GPU evaluates the batch at once.
def windows_per_evaluation(cfg: TrainConfig) -> int:
    return 1 if mx.default_device() == mx.cpu else cfg.batch_size


SETTING_HELP = {
    "layers": "transformer layers",
    "model_dim": "model width",
    "head_dim": "width of an attention head (even)",
    "vocab_size": "sentencepiece pieces, trained on --text",
    "context": "tokens per training window, and the model's context",
    "batch_size": "windows per step",
    "steps": "optimizer steps",
    "learning_rate": "peak learning rate, after the warm-up",
    "min_lr_ratio": "the cosine decay ends at learning rate x this (0 to 1)",
    "warmup": "linear warm-up steps (0: none), fewer than --steps (default: min(40, steps / 10))",
    "weight_decay": "AdamW's weight decay",
    "grad_clip": "largest global gradient norm",
    "seed": f"seed of the initialization and the batch order (0 to {MAX_SEED})",
}


def loss_fn(model: Model, batch: mx.array) -> mx.array:
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def evaluate(model: Model, tokens: np.ndarray, context: int) -> float:
    """Mean loss over the fixed validation windows."""
    return float(np.mean([loss_fn(model, w).item() for w in validation_windows(tokens, context)]))


def train(
    text: Path,
    output: Path,
    val_text: Optional[Path] = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    eval_every: int = 100,
    force: bool = False,
    **settings,
) -> Path:
    """Train a model on `text` into `output`; returns the written model folder."""
    cfg, output = TrainConfig(**settings), Path(output)
    check_options({"checkpoint_every": checkpoint_every, "eval_every": eval_every}, TRAIN_RULES)
    cfg.check()
    for path in (text, val_text):
        if path is not None and not Path(path).is_file():
            raise OpenELMError(f"no text file at {path}")
    texts = [read_text(Path(path)) if path is not None else None for path in (text, val_text)]
    created = not output.exists() or force
    with start_run(output, asdict(cfg), resume, force, reads=[text, val_text]):  # the run's lock, held to the end
        try:
            return _train(cfg, output, (text, val_text), texts, resume, checkpoint_every, eval_every)
        except BaseException:
            if not resume and not (output / CHECKPOINT).exists():  # nothing to resume: leave nothing
                for path in [output] if created else list(output.iterdir()):
                    remove(path)
            raise


def _train(cfg: TrainConfig, output: Path, paths, texts, resume, checkpoint_every, eval_every) -> Path:
    """train()'s work inside the run folder; `paths` and `texts`: the training and validation
    text files and their contents (None for no validation text)."""
    text = paths[0]
    check_output(output / "model", force=True, reads=paths)  # now, not after the last step
    tokenizer_file = output / "tokenizer.model"
    if resume and not os.path.lexists(tokenizer_file):  # training a new one would change every token
        raise OpenELMError(f"--resume: {tokenizer_file} is missing: put the run's tokenizer back, or {RESTART}")
    tokenizer = Tokenizer(tokenizer_file) if resume else train_tokenizer(Path(text), output, cfg.vocab_size)
    tokenizer_sha256 = hashlib.sha256(tokenizer.data).hexdigest()
    train_tokens = encode_documents(tokenizer, texts[0])
    val_tokens = encode_documents(tokenizer, texts[1]) if texts[1] is not None else None
    # A batch is a window of context + 1 tokens (inputs and their next tokens), so is a validation window.
    for path, tokens in zip(paths, (train_tokens, val_tokens)):
        if tokens is not None and len(tokens) <= cfg.context + 1:
            raise OpenELMError(
                f"{path} has {len(tokens)} tokens, too few for a window of --context {cfg.context} + 1: "
                "give a longer text or a smaller --context"
            )

    config = cfg.model_config(tokenizer)
    mx.random.seed(cfg.seed)
    model, optimizer = cpu_layers.swap(Model(config)), cfg.optimizer()  # a CPU's layers, as at load
    state = {"config": asdict(cfg), "step": 0, "seconds": 0.0, "train_loss": [], "val_loss": []}
    state["tokenizer_sha256"] = tokenizer_sha256  # --resume refuses another tokenizer
    if resume:
        state = load_checkpoint(output, model, optimizer, asdict(cfg), tokenizer_sha256)
    optimizer.init(model.trainable_parameters())  # keeps the moments a checkpoint restored
    print(
        f"model: {config.num_parameters() / 1e6:.2f}M parameters, q heads {config.num_query_heads}, "
        f"ffn {config.ffn_dims}; {len(train_tokens) / 1e6:.2f}M training tokens"
    )
    optimize(model, optimizer, cfg, state, output, train_tokens, val_tokens, checkpoint_every, eval_every)

    weights = dict(tree_flatten(model.parameters()))
    folder = output / "model"
    write_model_folder(folder, config, weights, mx.float32, output, tokenizer, force=True, reads=paths)
    plot_losses(state, output / "loss_curve.png")
    print(f"trained {state['step']} steps in {state['seconds'] / 60:.1f} min; model in {folder}")
    return folder


def optimize(model, optimizer, cfg: TrainConfig, state, output, train_tokens, val_tokens, checkpoint_every, eval_every):
    """Steps state["step"] .. cfg.steps: a compiled update per batch, the losses into `state`,
    validation every eval_every steps and a checkpoint every checkpoint_every, and at the end."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    compiled_state = [model.state, optimizer.state]
    part = windows_per_evaluation(cfg)
    parts = cfg.batch_size // part  # batch_size is a multiple of part (1 or itself)

    @partial(mx.compile, inputs=model.state, outputs=model.state)  # value_and_grad sets the model's parameters
    def gradient(windows):
        return loss_and_grad(model, windows)

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def update(grads):
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)

    first, tokens_per_step = state["step"], cfg.batch_size * cfg.context
    start = time.perf_counter() - state["seconds"]
    bar = progress_bar(range(first, cfg.steps), initial=first, total=cfg.steps, unit="step", dynamic_ncols=True)
    stats = ""
    with bar:  # closed before the run's last word (interrupted, an error)
        for i in bar:
            step_start, batch = time.perf_counter(), batch_at(train_tokens, i, cfg.seed, cfg.batch_size, cfg.context)
            loss, grads = 0.0, None
            for k in range(parts):  # the mean loss of the batch is the mean of its parts' means
                part_loss, part_grads = gradient(batch[k * part : (k + 1) * part])
                loss = loss + part_loss
                grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
                if parts > 1:
                    mx.eval(loss, grads)
                    within(bar, f"{stats}window {(k + 1) * part}/{cfg.batch_size}")
            if parts > 1:
                loss, grads = loss / parts, tree_map(lambda g: g / parts, grads)
            update(grads)
            mx.eval(loss, compiled_state)
            if not math.isfinite(loss.item()):  # diverged: every later step would be NaN too
                raise OpenELMError(
                    f"the training loss is {loss.item()} at step {i + 1}: the run diverged: "
                    "start again with a lower --learning-rate (and --force)"
                )
            if i == first:  # the first step (its compilation included) measures the rest
                what = f"train: {cfg.steps - first} steps of {cfg.batch_size} windows x {cfg.context} tokens"
                announce(bar, what, time.perf_counter() - step_start, cfg.steps - first, "step")
            state["step"], state["seconds"] = i + 1, time.perf_counter() - start
            state["train_loss"].append((i + 1, round(loss.item(), 4)))
            rate = tokens_per_step * (bar.format_dict["rate"] or 0)
            stats = f"loss={loss.item():.3f}, lr={optimizer.learning_rate.item():.1e}, tok_s={rate:.0f}, "
            bar.set_postfix_str(stats.rstrip(", "))
            done = i + 1 == cfg.steps
            if val_tokens is not None and ((i + 1) % eval_every == 0 or done):
                state["val_loss"].append((i + 1, round(evaluate(model, val_tokens, cfg.context), 4)))
                bar.write(f"step {i + 1}: train loss {loss.item():.3f}, validation loss {state['val_loss'][-1][1]:.3f}")
            if (i + 1) % checkpoint_every == 0 or done:
                save_checkpoint(output, model, optimizer, state)


def add_arguments(parser):
    d = TrainConfig()
    parser.add_argument("output", type=Path, help="run folder (tokenizer, checkpoints, final model)")
    parser.add_argument("--text", type=Path, required=True, help="training text, one document a line")
    parser.add_argument("--val-text", type=Path, help="validation text (never trained on)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--force", action="store_true", help="start over in a non-empty output folder")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    for name, value in asdict(d).items():
        default = None if name == "warmup" else value  # default_warmup(--steps)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=default, help=SETTING_HELP[name])


def main(args):
    settings = {k: getattr(args, k) for k in asdict(TrainConfig())}
    train(
        args.text,
        args.output,
        val_text=args.val_text,
        resume=args.resume,
        force=args.force,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        **settings,
    )
