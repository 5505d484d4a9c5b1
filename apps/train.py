"""`openelm train`: train a small OpenELM (layer-wise scaling, GQA, QK-norm, tied embeddings) on a
text file with MLX: a sentencepiece tokenizer trained on the same text, AdamW with warm-up and cosine
decay, gradient clipping, a progress bar, and checkpoints that `--resume` continues from exactly.

The output folder holds tokenizer.model, train_state.json (settings, step, loss history),
checkpoint/ (weights and optimizer state) and, at the end, model/ (config.json, model.safetensors,
tokenizer.model: loadable by openelm_mlx.load and mlx_lm.load) and loss_curve.png.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer

STATE = "train_state.json"
EVAL_WINDOWS = 16  # validation windows scored during training: a quick, fixed subset


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
    warmup: int = 40  # warm-up steps
    weight_decay: float = 0.1  # AdamW's
    grad_clip: float = 1.0  # maximum global gradient norm
    seed: int = 0  # initialization and batch order

    def model_config(self, tokenizer: Tokenizer) -> OpenELMConfig:
        # ffn widths in multiples of 64 (not corenet's 256) let small models keep their per-layer
        # scaling; every width stays divisible by 64, as 4/8-bit group quantization needs.
        return OpenELMConfig.layerwise(
            self.layers,
            self.model_dim,
            self.head_dim,
            ffn_dim_divisor=64,
            vocab_size=tokenizer.vocab_size,
            max_context_length=self.context,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
        )


def train_tokenizer(text_file: Path, output: Path, vocab_size: int) -> Tokenizer:
    """A LLaMA-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback) on the text."""
    import sentencepiece as spm

    prefix = output / "tokenizer-tmp"
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=1 << 16,
            character_coverage=1.0,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a --vocab-size the text is too small for
        why = str(e).splitlines()[-1].rsplit("] ", 1)[-1]  # drop sentencepiece's source location
        raise OpenELMError(f"cannot train the tokenizer on {text_file}: {why}") from None
    Path(f"{prefix}.vocab").unlink()
    path = Path(f"{prefix}.model").rename(output / "tokenizer.model")
    return Tokenizer(path)


def encode_documents(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One token stream: each non-empty line is a document, BOS line EOS."""
    lines = [line for line in text.splitlines() if line.strip()]
    ids = []
    for tokens in tokenizer.sp.encode(lines):
        ids.extend([tokenizer.bos_id, *tokens, tokenizer.eos_id])
    return np.array(ids, dtype=np.int32)


def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> mx.array:
    """Random windows of context + 1 tokens; a function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.context - 1, cfg.batch_size)
    return mx.array(np.stack([tokens[s : s + cfg.context + 1] for s in starts]))


def loss_fn(model: Model, batch: mx.array) -> mx.array:
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def evaluate(model: Model, tokens: np.ndarray, context: int, max_windows: int = EVAL_WINDOWS) -> float:
    """Mean loss over the first `max_windows` non-overlapping windows of the validation stream."""
    n = min(max_windows, (len(tokens) - 1) // context)
    windows = [tokens[i * context : i * context + context + 1] for i in range(n)]
    losses = [loss_fn(model, mx.array(w[None])).item() for w in windows]
    return float(np.mean(losses))


def schedule(cfg: TrainConfig):
    warmup = optim.linear_schedule(cfg.learning_rate / cfg.warmup, cfg.learning_rate, cfg.warmup)
    decay = optim.cosine_decay(cfg.learning_rate, cfg.steps - cfg.warmup, cfg.learning_rate * cfg.min_lr_ratio)
    return optim.join_schedules([warmup, decay], [cfg.warmup])


def save_checkpoint(output: Path, model: Model, optimizer, state: dict):
    """Weights, optimizer moments and the step, written to a temp folder and swapped in whole."""
    tmp, final = output / "checkpoint.tmp", output / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / STATE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (output / STATE).write_text(json.dumps(state, indent=1))


def load_checkpoint(output: Path, model: Model, optimizer) -> dict:
    folder = output / "checkpoint"
    if not (folder / STATE).is_file():
        raise OpenELMError(f"--resume: no checkpoint in {output}: start without --resume")
    model.load_weights(str(folder / "model.safetensors"))
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return json.loads((folder / STATE).read_text())


def export_model(output: Path, model: Model, config: OpenELMConfig, dtype=mx.float32) -> Path:
    """model/: config.json + model.safetensors (HF names) + tokenizer.model."""
    tmp, final = output / "model.tmp", output / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    shutil.copy(output / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def plot_losses(state: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'openelm-mlx[bench]'): no loss curve drawn")
        return None
    train, val = np.array(state["train_loss"]), np.array(state["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    window = 20
    if len(train) >= window:
        smooth = np.convolve(train[:, 1], np.ones(window) / window, mode="valid")
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(train[window - 1 :, 0], smooth, color="tab:blue", label=f"train (mean of {window} steps)")
    else:
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", label="train")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="tab:orange", label=f"validation (first {EVAL_WINDOWS} windows)")
    c = state["config"]
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats/token)",
        ylim=(None, min(8.5, train[:, 1].max() + 0.2)),
        title=f"OpenELM {c['layers']}L d{c['model_dim']} on KJV: batch {c['batch_size']}x{c['context']} tokens",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    """Train a model on `text` into `output`; returns the exported model folder."""
    from tqdm import tqdm

    cfg = TrainConfig(**settings)
    output = Path(output)
    for path in (text, val_text):
        if path is not None and not Path(path).is_file():
            raise OpenELMError(f"no text file at {path}")
    if cfg.warmup >= cfg.steps:
        raise OpenELMError(f"--warmup ({cfg.warmup}) must be smaller than --steps ({cfg.steps})")
    if resume:
        saved = json.loads((output / STATE).read_text())["config"] if (output / STATE).is_file() else None
        if saved is None:
            raise OpenELMError(f"--resume: no {STATE} in {output}: start without --resume")
        changed = [f"{k} {saved[k]} -> {v}" for k, v in asdict(cfg).items() if saved.get(k) != v]
        if changed:
            raise OpenELMError(
                f"--resume with other settings than the run in {output} ({'; '.join(changed)}): use the same ones"
            )
    elif output.exists() and any(output.iterdir()):
        if not force:
            raise OpenELMError(f"{output} is not empty: pass --resume to continue the run or --force to start over")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)

    tokenizer_file = output / "tokenizer.model"
    tokenizer = (
        Tokenizer(tokenizer_file) if tokenizer_file.is_file() else train_tokenizer(Path(text), output, cfg.vocab_size)
    )
    train_tokens = encode_documents(tokenizer, Path(text).read_text())
    val_tokens = encode_documents(tokenizer, Path(val_text).read_text()) if val_text else None
    if len(train_tokens) <= cfg.context + 1:
        raise OpenELMError(f"{text} has only {len(train_tokens)} tokens, fewer than --context {cfg.context}")

    config = cfg.model_config(tokenizer)
    mx.random.seed(cfg.seed)
    model = Model(config)
    optimizer = optim.AdamW(learning_rate=schedule(cfg), betas=[0.9, 0.95], weight_decay=cfg.weight_decay)
    state = {"config": asdict(cfg), "step": 0, "seconds": 0.0, "train_loss": [], "val_loss": []}
    if resume:
        state = load_checkpoint(output, model, optimizer)
    optimizer.init(model.trainable_parameters())  # keeps the moments a checkpoint restored
    print(
        f"model: {config.num_parameters() / 1e6:.2f}M parameters, q heads {config.num_query_heads}, "
        f"ffn {config.ffn_dims}; {len(train_tokens) / 1e6:.2f}M training tokens"
    )

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    compiled_state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(batch):
        loss, grads = loss_and_grad(model, batch)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return loss

    start, tokens_per_step = time.perf_counter() - state["seconds"], cfg.batch_size * cfg.context
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, unit="step", dynamic_ncols=True)
    for i in bar:
        loss = step(batch_at(train_tokens, i, cfg))
        mx.eval(loss, compiled_state)
        state["step"], state["seconds"] = i + 1, time.perf_counter() - start
        state["train_loss"].append((i + 1, round(loss.item(), 4)))
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            lr=f"{optimizer.learning_rate.item():.1e}",
            tok_s=f"{tokens_per_step * (bar.format_dict['rate'] or 0):.0f}",
        )
        done = i + 1 == cfg.steps
        if val_tokens is not None and ((i + 1) % eval_every == 0 or done):
            state["val_loss"].append((i + 1, round(evaluate(model, val_tokens, cfg.context), 4)))
            bar.write(f"step {i + 1}: train loss {loss.item():.3f}, validation loss {state['val_loss'][-1][1]:.3f}")
        if (i + 1) % checkpoint_every == 0 or done:
            save_checkpoint(output, model, optimizer, state)
    bar.close()

    folder = export_model(output, model, config)
    plot_losses(state, output / "loss_curve.png")
    print(f"trained {state['step']} steps in {state['seconds'] / 60:.1f} min; model in {folder}")
    return folder


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
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")


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
