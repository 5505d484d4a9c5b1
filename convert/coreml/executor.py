"""A numpy executor for the saved ML Programs that coreml_export writes, so packages can be run
and checked on Linux, where Core ML does not exist.

The program is read back from disk (spec + weights folder) with coremltools' milproto loader;
every op is then run by the numpy code below, not by coremltools. Only the ops the exporter
emits (and that coremltools' passes leave behind) are implemented: anything else is refused.
Floating-point ops compute in fp32 and round their result to the dtype the program declares,
as a GPU does (fp16 storage, fp32 accumulation).
"""

from pathlib import Path
from typing import Callable, Dict

import numpy as np

from openelm_mlx.errors import OpenELMError

OPS: Dict[str, Callable] = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


def load_program(package):
    """(pymil Program, spec) of a saved .mlpackage, spec and weights both read from disk."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise OpenELMError(f"{package} is not a Core ML package (no Manifest.json): pass the .mlpackage folder")
    try:
        mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
        spec = mlmodel.get_spec()
        return load(spec, spec.specificationVersion, mlmodel.weights_dir), spec
    except OpenELMError:
        raise
    except Exception as e:  # protobuf, blob-reader and MIL type errors all mean a broken package
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OpenELMError(
            f"{package} cannot be loaded as an ML Program ({type(e).__name__}: {first}): re-export it"
        ) from None


class MILExecutor:
    """Runs the functions of a saved ML Program: `run(function, inputs, states) -> outputs`."""

    def __init__(self, package):
        self.package = Path(package)
        self.program, self.spec = load_program(package)
        self._consts: Dict[str, Dict[str, np.ndarray]] = {}

    @property
    def functions(self):
        return list(self.program.functions)

    def function(self, name: str):
        if name not in self.program.functions:
            raise OpenELMError(f"{self.package} has no function '{name}' (it has {', '.join(self.functions)})")
        return self.program.functions[name]

    def make_state(self, function: str) -> Dict[str, np.ndarray]:
        """Zero-filled states of a function, as Core ML's make_state() gives them."""
        from coremltools.converters.mil.mil import types

        out = {}
        for name, var in self.function(function).inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                out[name] = np.zeros(wrapped.get_shape(), types.nptype_from_builtin(wrapped.get_primitive()))
        return out

    def constants(self, function: str) -> Dict[str, np.ndarray]:
        """Every const of a function by name, compressed weights decompressed (computed once)."""
        if function not in self._consts:
            env = {}
            for operation in self.function(function).operations:
                if operation.op_type == "const" or operation.op_type.startswith("constexpr_"):
                    self._execute(operation, env, {})
            self._consts[function] = env
        return self._consts[function]

    def run(self, function: str, inputs: Dict[str, np.ndarray], states: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Execute `function`; states are updated in place (like MLState); returns its outputs."""
        from coremltools.converters.mil.mil import types

        func = self.function(function)
        env = dict(self.constants(function))
        for name, var in func.inputs.items():
            if types.is_state(var.sym_type):
                if name not in states:
                    raise OpenELMError(f"state '{name}' of function '{function}' was not given")
                env[name] = name  # a state var evaluates to its name; state ops look it up
            elif name not in inputs:
                raise OpenELMError(f"input '{name}' of function '{function}' was not given")
            else:
                value = np.asarray(inputs[name])
                expected = types.nptype_from_builtin(var.dtype)
                if value.dtype != expected or value.ndim != var.rank:
                    raise OpenELMError(
                        f"input '{name}' must be {np.dtype(expected).name} of rank {var.rank}, "
                        f"got {value.dtype} {value.shape}"
                    )
                env[name] = value
        for operation in func.operations:
            if operation.outputs[0].name not in env:
                self._execute(operation, env, states)
        return {var.name: env[var.name] for var in func.outputs}

    def _execute(self, operation, env, states):
        from coremltools.converters.mil.mil import types

        fn = OPS.get(operation.op_type)
        if fn is None:
            raise OpenELMError(
                f"the MIL executor has no implementation of op '{operation.op_type}' (op '{operation.name}'): "
                "the package holds an op this exporter never emits; it cannot be checked"
            )
        args = {}
        for key, var in ({} if operation.op_type == "const" else operation.inputs).items():
            if isinstance(var, (list, tuple)):
                args[key] = [env[v.name] for v in var]
            else:
                args[key] = env[var.name]
        if operation.op_type in ("read_state", "coreml_update_state"):
            args["states"] = states
        if operation.op_type == "const":
            args["val"] = operation.outputs[0].val
        results = fn(**args)
        results = results if isinstance(results, (list, tuple)) else [results]
        for var, value in zip(operation.outputs, results):
            dtype = types.nptype_from_builtin(var.dtype)
            value = np.asarray(value).astype(dtype, copy=False)
            if not types.is_state(var.sym_type) and var.shape and not _shape_fits(value.shape, var.shape):
                raise OpenELMError(
                    f"op '{operation.name}' ({operation.op_type}) produced shape {value.shape}, "
                    f"the program declares {var.shape}"
                )
            env[var.name] = value


def _shape_fits(actual, declared) -> bool:
    return len(actual) == len(declared) and all(
        not isinstance(d, (int, np.integer)) or a == d for a, d in zip(actual, declared)
    )


def f32(x):
    x = np.asarray(x)
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


# --- constants and decompression -------------------------------------------------------------


@op("const")
def _const(val):
    return np.asarray(val)


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    """output = scale * (data - offset), each scale covering a block of data.shape / scale.shape."""
    data = data.astype(np.float32)
    if offset is not None:
        data = data - _expand_blocks(offset.astype(np.float32), data.shape)
    return data * _expand_blocks(scale.astype(np.float32), data.shape)


def _expand_blocks(x, shape):
    for axis, (n, m) in enumerate(zip(shape, x.shape)):
        if n % m:
            raise OpenELMError(f"blockwise dequantization: dim {axis} of size {n} is not a multiple of {m} blocks")
        x = np.repeat(x, n // m, axis=axis)
    return x


@op("constexpr_lut_to_dense")
def _lut_to_dense(indices, lut, vector_axis=None):
    """Palettized weights: each group of indices (lut.shape[:rank] groups per axis) reads its own LUT."""
    if lut.shape[-1] != 1:
        raise OpenELMError("vector palettization (VECTOR_SIZE > 1) is not used by the exporter")
    indices = indices.astype(np.int64)
    rank = indices.ndim
    group = [np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:rank])]
    grid = np.ix_(*group)
    return lut[(*grid, indices, 0)]


# --- state -----------------------------------------------------------------------------------


@op("read_state")
def _read_state(input, states):
    return states[input].copy()


@op("coreml_update_state")
def _update_state(state, value, states):
    if value.shape != states[state].shape:
        raise OpenELMError(f"state '{state}' {states[state].shape} cannot take a value of shape {value.shape}")
    states[state][...] = value
    return value


# --- elementwise -----------------------------------------------------------------------------


@op("add")
def _add(x, y):
    return f32(x) + f32(y)


@op("sub")
def _sub(x, y):
    return f32(x) - f32(y)


@op("mul")
def _mul(x, y):
    return f32(x) * f32(y)


# exact on integers and booleans, whatever the dtype: no float32 detour
for _name, _fn in {
    "maximum": np.maximum,
    "minimum": np.minimum,
    "less_equal": np.less_equal,
    "greater_equal": np.greater_equal,
}.items():
    OPS[_name] = lambda x, y, fn=_fn: fn(x, y)


@op("select")
def _select(cond, a, b):
    return np.where(cond, f32(a), f32(b))


@op("cast")
def _cast(x, dtype):
    return x  # the output var's declared dtype does the conversion


@op("rsqrt")
def _rsqrt(x, epsilon=None):
    return 1.0 / np.sqrt(f32(x) + (0.0 if epsilon is None else np.float32(epsilon)))


@op("silu")
def _silu(x):
    x = f32(x)
    return x / (1.0 + np.exp(-x))


@op("reduce_mean")
def _reduce_mean(x, axes=None, keep_dims=False):
    axes = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
    return f32(x).mean(axis=axes, keepdims=bool(keep_dims))


# --- linear algebra --------------------------------------------------------------------------


@op("linear")
def _linear(x, weight, bias=None):
    y = f32(x) @ f32(weight).T
    return y if bias is None else y + f32(bias)


@op("scaled_dot_product_attention")
def _sdpa(query, key, value, attn_mask=None):
    q, k, v = f32(query), f32(key), f32(value)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(np.float32(q.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, -np.inf)
        else:
            scores = scores + f32(attn_mask)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


# --- shapes and indexing ---------------------------------------------------------------------


@op("shape")
def _shape(x):
    return np.array(x.shape, np.int32)


@op("reshape")
def _reshape(x, shape):
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("transpose")
def _transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@op("expand_dims")
def _expand_dims(x, axes):
    for axis in sorted(int(a) if a >= 0 else int(a) + x.ndim + len(axes) for a in axes):
        x = np.expand_dims(x, axis)
    return x


@op("squeeze")
def _squeeze(x, axes=None):
    return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))


@op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise OpenELMError("concat with interleave=True is not used by the exporter")
    return np.concatenate(values, axis=int(axis))


@op("split")
def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        return np.split(x, int(num_splits), axis=axis)
    return np.split(x, np.cumsum(split_sizes)[:-1], axis=axis)


@op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims:
        raise OpenELMError("gather with batch_dims is not used by the exporter")
    axis = int(axis)
    n = x.shape[axis]
    if np.any(indices >= n) or np.any(indices < -n):
        raise OpenELMError(f"gather: index out of range for an axis of size {n} (indices {np.unique(indices)[:8]})")
    return np.take(x, indices, axis=axis)


@op("range_1d")
def _range_1d(start, end, step):
    return np.arange(int(start), int(end), int(step), dtype=np.int32)


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = len(shape)
    stride = [1] * rank if stride is None else stride
    out, squeeze = [], []
    for i in range(rank):
        if squeeze_mask is not None and squeeze_mask[i]:
            out.append(int(begin[i]))
            squeeze.append(i)
            continue
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        out.append(slice(b, e, int(stride[i])))
    return tuple(out)


@op("slice_by_index")
def _slice_by_index(x, begin, end, **masks):
    return x[_slices(x.shape, begin, end, **masks)]


@op("slice_update")
def _slice_update(x, update, begin, end, **masks):
    index = _slices(x.shape, begin, end, **masks)
    out = x.copy()
    if out[index].shape != update.shape:
        raise OpenELMError(
            f"slice_update: the slice {out[index].shape} of a {x.shape} tensor at begin {list(begin)} "
            f"end {list(end)} does not match the update {update.shape} (position past the context?)"
        )
    out[index] = update
    return out
