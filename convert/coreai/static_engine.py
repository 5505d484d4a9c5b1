"""A Python twin of Apple's StaticShapeEngine, the stock Swift driver of iOS LanguageBundles
(coreai-models swift/Sources/CoreAILanguageModels/InferenceEngines/CoreAIStaticShapeEngine.swift,
main 86b363dca67c; "Swift:N" below is a line there), driving an `.aimodel` of the static-shape
contract (ios_graph.py) through Apple's runtime (coreai.runtime) step by step as the Swift code
does, behind our PackageRunner interface so that verify, generate and bench run it.

What differs, and why: sampling is the caller's (PackageModel, verify) on the float32 copy of
the row the Swift engine hands its CPU sampler (Swift:438-461); prefix caching across calls
(Swift:341-355) is the caller's too (reset() for a new sequence, rewind() to a prefix)."""

from typing import Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError

from ..package_input import PackageInfo
from .bundle import KEY_CACHE, LOGITS, VALUE_CACHE, Bundle
from .runtime import CoreAIEngine

MASKED = np.float16(-40000.0)  # Swift:312


class StaticShapeEngine(CoreAIEngine):
    """StaticShapeEngine.init (Swift:67-128) at construction; prefill/decode = inference().
    Every function is loaded up front, as the Swift's warmup does after init (Swift:602-607,
    ModelResources.swift:168), rather than on first use (Swift:206-213)."""

    def __init__(self, bundle: Bundle, info: PackageInfo, names: Sequence[str]):
        super().__init__(bundle, info, list(names))
        self.max_context_length = bundle.max_context_length  # config.maxContextLength, from metadata.json
        # Swift:76-80: decoder functions (extend* and prompt*) sorted by name, gather functions by name.
        self.extend_names = sorted(n for n in names if n.startswith(("extend", "prompt")))
        self.gather_names = {n for n in names if n.startswith("gather_embeddings")}
        # Swift:86-90: the largest trailing number of a decoder name, 64 if none.
        self.max_query_length = max(
            (int(n.split("_")[-1]) for n in self.extend_names if is_int(n.split("_")[-1])), default=64
        )
        # Swift:94-105: an extend whose key_cache context equals max_context_length is required
        # (the first in name order; extend_* sorts before prompt_*).
        largest = next((n for n in self.extend_names if self._context_length(n) == self.max_context_length), None)
        if largest is None:
            raise OpenELMError(
                f"{bundle.path}: no function's key_cache holds language.max_context_length {self.max_context_length} "
                "tokens, which Apple's static-shape engine requires: re-export the bundle"
            )
        self._check_contract(largest)  # Swift:108
        if "load_embeddings" not in self.functions:
            raise OpenELMError(f"{bundle.path}: no load_embeddings function: re-export the bundle")
        # Swift:111, 179-202: load_embeddings run once, its embedding_table kept for every call.
        self._embedding_table = self.run("load_embeddings", {}, {})["embedding_table"]
        # Swift:114-125: one buffer per cache, shaped by the max-context function's descriptor.
        # Swift's NDArray(descriptor:) is IOSurface memory; the Linux runtime's storage is not
        # zeroed, so these start at zero (a guess at the device's: unwritten columns are masked
        # to -40000 either way, but NaN garbage would survive a zero softmax weight).
        desc = self.functions[largest].desc
        self._caches = {
            name: np.zeros(desc.state_descriptor(name).shape, desc.state_descriptor(name).dtype)
            for name in (KEY_CACHE, VALUE_CACHE)
        }
        self.reset()

    def _context_length(self, name: str) -> int:
        """Swift:254-264, as written: the *largest dimension* of key_cache's shape (so a cache
        whose kv_max * head_dim rows exceed its context reports the rows), max_context_length
        for a dynamic one."""
        shape = list(self.functions[name].desc.state_descriptor(KEY_CACHE).shape)
        return self.max_context_length if -1 in shape else max(shape)

    def _check_contract(self, name: str):
        """Swift:155-177: out_logits, and no states or both caches."""
        desc = self.functions[name].desc
        states = set(desc.state_names)
        if LOGITS not in desc.output_names or len(states) == 1 or (states and not {KEY_CACHE, VALUE_CACHE} <= states):
            raise OpenELMError(
                f"{self.package}: function {name} has outputs {list(desc.output_names)} and states "
                f"{sorted(states)}, not out_logits with {KEY_CACHE} and {VALUE_CACHE}: re-export the bundle"
            )

    def reset(self):
        """Swift:583-600 (reset to 0): the token count only; the caches keep their contents,
        which the mask hides until each column is written again."""
        self.position = 0
        self.tokens = []

    # Our PackageRunner interface: the tokens so far are the Swift engine's inputTokens, and
    # each call processes those past processedTokenCount (self.position), Swift:370-453.
    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.tokens += self._checked(tokens)
        return self.inference()

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def rewind(self, n: int):
        """reset(to: n) (Swift:583-600): the tokens past n are dropped; the next window starts at the
        multiple of q at or below n and rewrites those columns with what they held (inference)."""
        super().rewind(n)
        self.tokens = self.tokens[:n]

    def forward_graph(self, remaining: int, position: int, prompt: bool) -> str:
        """Swift:268-298: q = the smallest query length >= remaining tokens (else the largest);
        among those, the smallest context > position; prompt_opt_ for a prefill window."""
        pairs = []
        for name in self.extend_names:
            parts = name.split("_")[-2:]
            if len(parts) == 2 and all(is_int(p) for p in parts):
                pairs.append((int(parts[0]), int(parts[1])))
        by_q = sorted(pairs, key=lambda p: p[1])
        q = next((p[1] for p in by_q if p[1] >= remaining), by_q[-1][1])
        ctx = next((c for c, pq in sorted(pairs) if pq == q and c > position), None)
        if ctx is None:
            raise OpenELMError(f"{self.package} has no graph with cache_len > {position} and seq_len = {q}")
        return f"{'prompt_opt' if prompt else 'extend'}_{ctx}_{q}"

    def inference(self) -> np.ndarray:
        """Swift:370-453: windows of q tokens from processedTokenCount to the end of the tokens."""
        total = len(self.tokens)
        logits = np.zeros(self.info.vocab_size, np.float16)  # Swift:381
        position = self.position
        while position < total:
            remaining = total - position
            prompt = remaining > self.max_query_length  # Swift:386: logits unread, prompt_opt_
            name = self.forward_graph(remaining, position, prompt)
            q = self._query_length(name)  # Swift:390
            start = (position // q) * q  # Swift:391: window start aligned down to a multiple of q
            end = min(start + q - 1, total - 1)  # Swift:392
            n = end - start + 1
            inputs = self._build_inputs(name, self.tokens[start : end + 1], q, start, n)
            out = self._run_with_caches(name, inputs)
            if not prompt:  # Swift:439-449: the row of the window's last real token
                logits = out[LOGITS].reshape(-1)[(n - 1) * self.info.vocab_size :][: self.info.vocab_size]
            position = end + 1  # Swift:451-452
            self.position = position
        return logits.astype(np.float32)

    def _query_length(self, name: str) -> int:
        """Swift:225-236: transformer_input's dim 1, else the name's last number."""
        desc = self.functions[name].desc
        tx = next((i for i in desc.input_names if "transformer_input" in i), None)
        if tx is not None and len(desc.input_descriptor(tx).shape) >= 2:
            return desc.input_descriptor(tx).shape[1]
        last = name.split("_")[-1]
        return int(last) if is_int(last) else 1

    def _run_with_caches(self, name: str, inputs: dict) -> dict:
        """Swift:414-433: the function's caches are views [..., :ctx] of the max-context buffers,
        bound by name, no copy on a graph switch. coreai.runtime's Python NDArray cannot wrap a
        strided view (it takes a numpy array and owns its storage), so the view is emulated: the
        leading ctx columns are copied in, and what the function wrote copied back."""
        from coreai.runtime import NDArray

        desc = self.functions[name].desc
        views = {}
        for state in (KEY_CACHE, VALUE_CACHE):
            shape = list(desc.state_descriptor(state).shape)
            index = tuple(slice(0, d) for d in shape)  # .slice(at: shape.map { 0..<$0 })
            views[state] = (index, NDArray(np.ascontiguousarray(self._caches[state][index])))
        out = self.run(name, inputs, {state: array for state, (_, array) in views.items()})
        for state, (index, array) in views.items():
            self._caches[state][index] = array.numpy()
        return out

    def _build_inputs(self, name: str, window: Sequence[int], q: int, start: int, n: int) -> dict:
        """Swift:466-531: inputs found by name in the function's descriptor."""
        desc = self.functions[name].desc
        names = list(desc.input_names)
        inputs = {}
        if "embedding_table" in names:  # Swift:476-478
            inputs["embedding_table"] = self._embedding_table
        tx = next((i for i in names if "transformer_input" in i), None)
        if tx is not None:  # Swift:481-491
            gather = f"gather_embeddings_{q}"
            if gather not in self.gather_names:
                raise OpenELMError(f"{self.package} has no gather function '{gather}' for batch size {q}")
            inputs[tx] = self._gather(gather, window, q)
        pos = next((i for i in names if "pos" in i), None)  # Swift:494-507: start+i, UInt16
        if pos is None:
            raise OpenELMError(f"{self.package}: graph '{name}' has no position_ids input")
        inputs[pos] = (start + np.arange(q, dtype=np.int64)).astype(np.uint16).reshape(desc.input_descriptor(pos).shape)
        if "causal_mask" in names:  # Swift:510-515, 302-326
            inputs["causal_mask"] = causal_mask(list(desc.input_descriptor("causal_mask").shape), n, start)
        step = next((i for i in names if "step" in i and "pos" not in i), None)
        if step is not None:  # Swift:518-528: in_step = the window start
            inputs[step] = np.array([start], np.int32)
        return inputs

    def _gather(self, name: str, window: Sequence[int], q: int):
        """Swift:535-572: the window's ids in the first slots of in_new_token_ids [1, q]. The rest
        are left as NDArray(descriptor:) made them, which this twin takes to be zeros (a guess);
        their rows are fully masked and their cache columns rewritten before they are read."""
        ids = np.zeros(q, np.int32)
        ids[: min(q, len(window))] = window[:q]
        out = self.run(name, {"in_new_token_ids": ids[None], "embedding_table": self._embedding_table}, {})
        return out["out_transformer_input"] if "out_transformer_input" in out else out[list(out)[0]]


def causal_mask(shape, n: int, start: int) -> np.ndarray:
    """Swift:302-326 on [1, ctx, 1, q]: -40000 everywhere, then 0 for key <= start+i on the first
    n (real) query rows."""
    mask = np.full(shape, MASKED, np.float16)
    for i in range(n):
        mask[:, : min(start + i, shape[1] - 1) + 1, :, i] = 0
    return mask


def is_int(text: str) -> bool:
    return text.isdigit()
