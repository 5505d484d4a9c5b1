"""Bad-input rows for exported packages read as input (issue 20 part 1): a Core AI bundle (float32,
context 96), an iOS one (static shapes, context 128) and a Core ML package with its tokenizer
folder, copied from the session's exports and damaged per row: edited openelm.* metadata, edited
bundle metadata.json, metadata that agrees with itself but not with the program, tokenizers of
another size, non-regular files where a package file belongs, and programs edited with their hash
rewritten (Apple's runtime aborts on them: probe.py isolates it). docs/packages.md lists which
check guards each field and file."""

import hashlib
import json
from pathlib import Path

from bad_input import DELETE, Row, Work, assign, category, special
from conftest import tiny_config

GEN_AI = ("generate", "--backend", "coreai", "--model", "{model}/b", "-p", "hi", "--max-tokens", "2")
GEN_IOS = ("generate", "--backend", "coreai", "--model", "{model}/ib", "-p", "hi", "--max-tokens", "2")
GEN_ML = ("generate", "--backend", "mil-reference", "--model", "{model}/p.mlpackage", "-p", "hi", "--max-tokens", "2")
VERIFY_AI = ("verify-coreai", "{model}/b", "--model", "{model}/ckpt", "--steps", "1")
VERIFY_IOS = ("verify-coreai", "{model}/ib", "--model", "{model}/ckpt", "--steps", "1")
VERIFY_ML = ("verify-coreml", "{model}/p.mlpackage", "--model", "{model}/ckpt", "--steps", "1")
BENCH_AI = ("bench", "--backend", "coreai", "--models", "{model}/b", "--out", "{out}", "-p", "4", "-g", "2")
BENCH_AI += ("--trials", "1", "--warmup", "0")
COREML_SPEC = "p.mlpackage/Data/com.apple.CoreML/model.mlmodel"
COREML_WEIGHTS = "p.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
REEXPORT = "re-export"


def asset(work: Work, bundle: str = "b") -> Path:
    """The bundle's model folder (b/<export name>.aimodel)."""
    return next((work.model / bundle).glob("*.aimodel"))


def ai_meta(bundle: str = "b", **changes):
    """Set (or remove) openelm.* keys of the bundle model's own metadata.json (all strings)."""

    def setup(work: Work):
        path = asset(work, bundle) / "metadata.json"
        raw = json.loads(path.read_text())
        assign(raw["creatorDefinedMetadata"], {f"openelm.{k.replace('__', '.')}": v for k, v in changes.items()})
        path.write_text(json.dumps(raw))

    return setup


def ai_meta_text(text: str):
    return lambda work: (asset(work) / "metadata.json").write_text(text)


def bundle_language(bundle: str = "b", **changes):
    def setup(work: Work):
        path = work.model / bundle / "metadata.json"
        raw = json.loads(path.read_text())
        assign(raw["language"], changes)
        path.write_text(json.dumps(raw))

    return setup


def ml_meta(**changes):
    """Set (or remove) openelm.* keys of the Core ML spec's userDefined metadata."""

    def setup(work: Work):
        from coremltools.proto import Model_pb2

        path = work.model / COREML_SPEC
        spec = Model_pb2.Model.FromString(path.read_bytes())
        meta = spec.description.metadata.userDefined
        for key, value in changes.items():
            key = f"openelm.{key}"
            meta.pop(key, None) if value is DELETE else meta.__setitem__(key, value)
        path.write_bytes(spec.SerializeToString())

    return setup


def rehashed(edit):
    """main.mlirb edited, main.hash rewritten to match: what only the runtime can discover."""

    def setup(work: Work):
        mlirb = asset(work) / "main.mlirb"
        data = edit(mlirb.read_bytes())
        mlirb.write_bytes(data)
        (asset(work) / "main.hash").write_bytes(hashlib.sha256(data).digest())

    return setup


def at(name: str, kind: str):
    """special() where a package file belongs; '{asset}' is the bundle's model folder."""

    def setup(work: Work):
        special(str(Path(name.format(asset=asset(work).relative_to(work.model)))), kind)(work)

    return setup


def tokenizer_of(size: str, where: str):
    def setup(work: Work):
        (work.model / where / "tokenizer.model").write_bytes(work.assets[f"tokenizer-{size}"].read_bytes())

    return setup


def tokenizer_json(edit):
    def setup(work: Work):
        path = work.model / "b" / "tokenizer" / "tokenizer.json"
        path.write_bytes(edit(path.read_bytes()))

    return setup


def drop_vocab_piece(data: bytes) -> bytes:
    raw = json.loads(data)
    raw["model"]["vocab"].popitem()
    return json.dumps(raw).encode()


def both(*setups):
    return lambda work: [setup(work) for setup in setups]


SMALLER = dict(context_length="64", prefill_length="64")
GRAPH_CONTEXT = "its metadata says 64 (context) but the program's KV-cache length is 96"
# Metadata that agrees with itself (the vocab_size, the config's, a bundle's language.vocab_size)
# but not with the program, whose logits are 384 wide: only check_graph can tell.
VOCAB_320 = dict(vocab_size="320", config=json.dumps(tiny_config(vocab_size=320).to_dict()))
GRAPH_VOCAB = "its metadata says 320 (vocab_size) but the program's logits size is 384"
NESTED = "[" * 100000 + "]" * 100000
CONFIG_LIST = json.dumps([1, 2, 3])
METADATA = [
    ("context-0", dict(context_length="0"), "field 'openelm.context_length' must be an integer from 1"),
    ("context-negative", dict(context_length="-96"), "field 'openelm.context_length' must be an integer from 1"),
    ("context-huge", dict(context_length=str(10**15)), "field 'openelm.context_length' must be an integer from 1"),
    ("context-text", dict(context_length="ninety"), "field 'openelm.context_length' must be an integer"),
    ("context-float", dict(context_length="96.0"), "field 'openelm.context_length' must be an integer"),
    ("prefill-past-context", dict(prefill_length="97"), "prefill_length 97 exceeds the context"),
    ("vocab-other", dict(vocab_size="320"), "the config's vocab_size is 384"),
    ("vocab-0", dict(vocab_size="0"), "field 'openelm.vocab_size' must be an integer from 1"),
    ("eos-past-vocab", dict(eos_token_id="384"), "a special token id is past the vocabulary"),
    ("exponents-nan", dict(ffn_scale_exponents="[NaN, 0, 0, 0]"), "NaN is not a JSON number"),
    ("exponents-inf", dict(ffn_scale_exponents="[1e999, 0, 0, 0]"), "beyond the range of a number"),
    ("exponents-float", dict(ffn_scale_exponents="[0.5, 0, 0, 0]"), "must be an integer from 0 to 64"),
    ("exponents-negative", dict(ffn_scale_exponents="[-3, 0, 0, 0]"), "must be an integer from 0 to 64"),
    ("exponents-short", dict(ffn_scale_exponents="[0, 0]"), "2 FFN scale exponents for 4 layers"),
    ("exponents-nested", dict(ffn_scale_exponents=NESTED), "nests JSON too deeply"),
    ("config-list", dict(config=CONFIG_LIST), "field 'openelm.config' must be an object"),
    ("config-not-json", dict(config="{vocab_size: 384"), "metadata key 'openelm.config' is not valid JSON"),
    ("config-duplicate-key", dict(config='{"a": 1, "a": 2}'), "key 'a' appears twice"),
    ("compression-unknown", dict(compression="int3"), "field 'openelm.compression' must be one of"),
    ("precision-unknown", dict(compute_precision="float64"), "field 'openelm.compute_precision' must be one of"),
    ("context-missing", dict(context_length=DELETE), "metadata key 'openelm.context_length' is missing"),
    ("vocab-missing", dict(vocab_size=DELETE), "metadata key 'openelm.vocab_size' is missing"),
]
COREAI_ONLY = [  # Core AI's metadata.json holds strings only; Core ML's protobuf map can hold nothing else
    ("exponents-number", dict(ffn_scale_exponents=0), "its metadata is not a map of strings"),
]

PACKAGE_ROWS = category(
    "package",
    *[Row(f"coreai-meta.{name}", GEN_AI, ai_meta(**change), msg) for name, change, msg in METADATA + COREAI_ONLY],
    *[Row(f"coreml-meta.{name}", GEN_ML, ml_meta(**change), msg) for name, change, msg in METADATA[:1]],
    Row("coreml-meta.context-smaller", GEN_ML, ml_meta(**SMALLER), GRAPH_CONTEXT),
    Row(
        "coreai-meta.context-smaller",
        GEN_AI,
        ai_meta(**SMALLER),
        "language.max_context_length 96 is not the model's 64",
    ),
    Row(
        "coreai-meta.context-smaller-both",
        GEN_AI,
        both(ai_meta(**SMALLER), bundle_language(max_context_length=64)),
        GRAPH_CONTEXT,
    ),
    Row(
        "verify-coreai.context-smaller-both",
        VERIFY_AI,
        both(ai_meta(**SMALLER), bundle_language(max_context_length=64)),
        GRAPH_CONTEXT,
    ),
    Row(
        "bench-coreai.vocab-other",
        BENCH_AI,
        both(ai_meta(vocab_size="320"), bundle_language(vocab_size=320)),
        "the config's vocab_size",
    ),
    Row("coreml-graph.vocab-other", GEN_ML, ml_meta(**VOCAB_320), GRAPH_VOCAB),
    Row("verify-coreml.graph-vocab-other", VERIFY_ML, ml_meta(**VOCAB_320), GRAPH_VOCAB),
    Row("coreai-graph.vocab-other", GEN_AI, both(ai_meta(**VOCAB_320), bundle_language(vocab_size=320)), GRAPH_VOCAB),
    *[
        Row(
            f"{name}.vocab-other",
            command,
            both(ai_meta("ib", **VOCAB_320), bundle_language("ib", vocab_size=320)),
            GRAPH_VOCAB,
        )
        for name, command in (("ios-graph", GEN_IOS), ("verify-ios-graph", VERIFY_IOS))
    ],
    Row("verify-coreai.vocab-other", VERIFY_AI, ai_meta(vocab_size="320"), "the config's vocab_size is 384"),
    Row(
        "verify-coreml.config-list", VERIFY_ML, ml_meta(config=CONFIG_LIST), "field 'openelm.config' must be an object"
    ),
    Row("verify-coreml.context-missing", VERIFY_ML, ml_meta(context_length=DELETE), "is missing"),
    Row("coreai-model-metadata.nested", GEN_AI, ai_meta_text(NESTED), "nests JSON too deeply"),
    Row("coreai-model-metadata.nan", GEN_AI, ai_meta_text('{"creatorDefinedMetadata": NaN}'), "is not valid JSON"),
    Row("coreai-model-metadata.list", GEN_AI, ai_meta_text("[]"), "its metadata is not a map of strings"),
    Row("coreai-model-metadata.empty", GEN_AI, ai_meta_text(""), "is empty"),
    Row("bundle.context-other", GEN_AI, bundle_language(max_context_length=64), "language.max_context_length 64"),
    Row("bundle.vocab-other", GEN_AI, bundle_language(vocab_size=320), "language.vocab_size 320 is not"),
    Row("bundle.vocab-bool", GEN_AI, bundle_language(vocab_size=True), "language.vocab_size must be int"),
    Row(
        "bundle.function-renamed", GEN_AI, bundle_language(function_map={"main": ["forward"]}), "no function 'forward'"
    ),
    Row("bundle.function-map-text", GEN_AI, bundle_language(function_map={"main": "main"}), "function_map must map"),
    Row("tokenizer.coreai-320", GEN_AI, tokenizer_of("320", "b/tokenizer"), "has 320 pieces"),
    Row("tokenizer.coreai-512", GEN_AI, tokenizer_of("512", "b/tokenizer"), "has 512 pieces"),
    Row("tokenizer.verify-coreai-512", VERIFY_AI, tokenizer_of("512", "b/tokenizer"), "has 512 pieces"),
    Row("tokenizer.verify-coreml-320", VERIFY_ML, tokenizer_of("320", "p.tokenizer"), "has 320 pieces"),
    Row("tokenizer.json-short", GEN_AI, tokenizer_json(drop_vocab_piece), "tokenizer.json has 383 pieces"),
    Row("tokenizer.json-invalid", GEN_AI, tokenizer_json(lambda d: d[:-10]), "tokenizer.json is not valid JSON"),
    Row("tokenizer.json-list", GEN_AI, tokenizer_json(lambda d: b"[]"), "is not a Hugging Face tokenizer file"),
    *[
        Row(f"files.{what}-{kind}", command, at(name, kind), "not a regular file")
        for what, command, name in (
            ("main-mlirb", GEN_AI, "{asset}/main.mlirb"),
            ("main-hash", GEN_AI, "{asset}/main.hash"),
            ("model-metadata", GEN_AI, "{asset}/metadata.json"),
            ("tokenizer-model", GEN_AI, "b/tokenizer/tokenizer.model"),
            ("manifest", GEN_ML, "p.mlpackage/Manifest.json"),
            ("model-mlmodel", GEN_ML, COREML_SPEC),
            ("weight-bin", GEN_ML, COREML_WEIGHTS),
            ("coreml-tokenizer", GEN_ML, "p.tokenizer/tokenizer.model"),
        )
        for kind in ("fifo", "device")
    ],
    Row("files.bundle-metadata-fifo", GEN_AI, at("b/metadata.json", "fifo"), "not a regular file"),
    Row("files.verify-weight-bin-device", VERIFY_ML, at(COREML_WEIGHTS, "device"), "not a regular file"),
    Row("runtime.flipped", GEN_AI, rehashed(lambda d: d[:100] + bytes([d[100] ^ 0xFF]) + d[101:]), "(SIGABRT)"),
    Row("runtime.truncated", VERIFY_AI, rehashed(lambda d: d[: len(d) // 2]), "cannot be loaded by Core AI"),
    Row(
        "runtime.bench-zeroed", BENCH_AI, rehashed(lambda d: d[:-5000] + bytes(5000)), "/b cannot be loaded by Core AI"
    ),
    Row("runtime.hash-mismatch", GEN_AI, lambda w: (asset(w) / "main.hash").write_bytes(bytes(32)), "main.hash"),
    base="packages",
)
