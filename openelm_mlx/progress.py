"""Progress on stderr, drawn only where a person watches it (a terminal): redirected output, logs
and the one-line error of a failed run stay free of bar fragments.

Long jobs (bench, train, eval, verify, the exporters) share these pieces: a bar over the job's
units (trials, steps, batches, decode steps); `within`, where the job is inside a unit (a layer of
a prompt, a block of tokens), so the bar moves every second or two even when a unit takes a
minute; `ticking`, a bar whose clock moves while a call that cannot report runs (Apple's runtime,
coremltools); and `announce`, a first line saying what will happen and about how long it will
take on this machine, estimated from the first unit measured.

`forward` is the other half of "every second or two": MLX runs a whole graph in one call that
Python cannot interrupt (a signal handler runs only between calls), and a 512-token prompt of the
270M shape took 56-111 s as one call on a 2-core CPU with the reference BLAS. Evaluated a layer at
a time, Ctrl-C acts between layers and the bar moves per layer.
"""

import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import mlx.core as mx

if TYPE_CHECKING:
    from tqdm import tqdm

# A job estimated to take longer than this says so first (shorter ones just run).
LONG_S = 30.0
# `within` redraws at most this often: a token loop calls it per token (ms apart on a GPU).
REDRAW_S = 0.5


def progress_bar(iterable=None, show: bool = True, **kwargs) -> "tqdm":
    # Imported here: generate imports this module for `forward`, and tqdm (~27 ms) is start-up time
    # that `openelm generate` would pay for nothing. disable=None is tqdm's "off unless a terminal".
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=None if show else True, **kwargs)


def within(bar: "tqdm", text: str):
    """Show where the job is inside the bar's current unit, redrawn at most every REDRAW_S."""
    if bar.disable:
        return
    bar.set_postfix_str(text, refresh=False)
    now = time.monotonic()
    if now - getattr(bar, "drawn_at", 0.0) >= REDRAW_S:
        bar.drawn_at = now
        bar.refresh()


@contextmanager
def ticking(bar: "tqdm", every: float = 1.0) -> Iterator[None]:
    """Redraw `bar` every `every` seconds from a thread while the block runs, so its elapsed time
    moves during one long call that reports nothing."""
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def duration(seconds: float) -> str:
    """'40 s', '9 min', '5.5 h': the precision an estimate has."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce(bar: "tqdm", plan: str, first_s: float, units: int, unit: str):
    """The first line of a long job, above its bar: `plan` (what will happen), then about how long
    `units` units take at the first one's measured `first_s` (nothing for a job under LONG_S).
        bench: 3 configurations x 4 trials; about 6 min on this machine (first trial 31 s)"""
    total = first_s * units
    if bar.disable or total < LONG_S:
        return
    bar.write(f"{plan}; about {duration(total)} on this machine (first {unit} {duration(first_s)})", file=sys.stderr)


def forward(model, tokens: mx.array, cache=None, on_layer: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """model.transformer(tokens, cache), the final norm applied (our Model or mlx-lm's OpenELM: the
    same names). With `on_layer`, called as on_layer(done, layers) after each layer, a CPU evaluates
    each layer there, so Ctrl-C acts between layers. On a GPU a whole prompt takes well under a
    second and a sync per layer would cost a few percent of a measured prefill: the graph stays
    whole and lazy there, as it does without `on_layer` (a caller that inspects the graph)."""
    t = model.transformer
    h = t.token_embeddings(tokens)
    cache = cache or [None] * len(t.layers)
    mask = "causal" if h.shape[1] > 1 else None  # as Transformer.__call__ (model.py)
    stepwise = on_layer is not None and mx.default_device() == mx.cpu
    for i, (layer, layer_cache) in enumerate(zip(t.layers, cache)):
        h = layer(h, mask, layer_cache)
        if stepwise:
            mx.eval(h)
        if on_layer:
            on_layer(i + 1, len(t.layers))
    return t.norm(h)
