"""Bad-input rows for the command line and the files around a checkpoint: numeric option values
(0, negative, NaN, inf, huge, beyond the model), usage errors of the argument parser (exit 2),
outputs that must not be written or replaced, `--text` files, missing optional extras, and
non-finite logits. Each row runs through tests/test_bad_input.py's runner."""

from bad_input import (
    BENCH,
    EVAL,
    GENERATE,
    SHADOW,
    Row,
    both,
    category,
    missing_module,
    nothing,
    root_file,
    root_folder,
    root_link,
)
from bad_input import TRAIN as TRAIN_ANY

from openelm_mlx.benchmarks.synthetic import TEXT

TRAIN = (*TRAIN_ANY, "--text", "text.txt")  # the text: the `text` setup
EXPORT_ML = ("export-coreml", "{model}", "-o", "{out}.mlpackage")
EXPORT_AI = ("export-coreai", "{model}", "-o", "{out}")  # a bundle folder
VERIFY_ML = ("verify-coreml", "{out}.mlpackage", "--model", "{model}")
VERIFY_AI = ("verify-coreai", "{out}", "--model", "{model}")
COUNT = "must be an integer from 1 to 2,147,483,648, got"
SEED = "must be an integer from 0 to 18,446,744,073,709,551,615, got"
text = root_file("text.txt", TEXT.encode())


def too_long(name: str) -> str:
    return name * (250 // len(name))


VALUES = category(
    "value",
    # eval ppl
    Row("eval-context-0", (*EVAL, "--context", "0"), nothing, f"--context {COUNT} 0"),
    Row("eval-context-negative", (*EVAL, "--context", "-3"), nothing, f"--context {COUNT} -3"),
    Row("eval-context-huge", (*EVAL, "--context", "99999999999999999999"), nothing, "got 99999999999999999999"),
    Row("eval-context-beyond-model", (*EVAL, "--context", "257"), nothing, "--context 257 exceeds the model's context"),
    Row("eval-batch-0", (*EVAL, "--batch-size", "0"), nothing, "--batch-size must be an integer from 1 to 4,096"),
    Row("eval-batch-huge", (*EVAL, "--batch-size", "100000"), nothing, "4,096, got 100000"),
    Row("eval-max-tokens-0", (*EVAL, "--max-tokens", "0"), nothing, f"--max-tokens {COUNT} 0"),
    Row("eval-max-tokens-negative", (*EVAL, "--max-tokens", "-5"), nothing, f"--max-tokens {COUNT} -5"),
    # train
    Row("train-steps-0", (*TRAIN, "--steps", "0"), text, f"--steps {COUNT} 0"),
    Row("train-steps-negative", (*TRAIN, "--steps", "-1"), text, f"--steps {COUNT} -1"),
    Row("train-layers-0", (*TRAIN, "--layers", "0"), text, "--layers must be an integer from 1 to 1,024, got 0"),
    Row("train-layers-huge", (*TRAIN, "--layers", "5000"), text, "1,024, got 5000"),
    Row("train-model-dim-0", (*TRAIN, "--model-dim", "0"), text, "--model-dim must be an integer from 1 to 65,536"),
    Row("train-head-dim-odd", (*TRAIN, "--head-dim", "33"), text, "--head-dim must be an even integer from 2 to 4,096"),
    Row("train-head-dim-0", (*TRAIN, "--head-dim", "0"), text, "--head-dim must be an even integer from 2"),
    Row("train-vocab-too-small", (*TRAIN, "--vocab-size", "100"), text, "--vocab-size must be an integer from 260"),
    Row("train-vocab-huge", (*TRAIN, "--vocab-size", "2000000"), text, "1,048,576, got 2000000"),
    Row("train-context-0", (*TRAIN, "--context", "0"), text, "--context must be an integer from 1"),
    Row("train-batch-0", (*TRAIN, "--batch-size", "0"), text, "--batch-size must be an integer from 1"),
    Row("train-lr-0", (*TRAIN, "--learning-rate", "0"), text, "--learning-rate must be in (0, 10], got 0.0"),
    Row("train-lr-nan", (*TRAIN, "--learning-rate", "nan"), text, "--learning-rate must be finite and in (0, 10]"),
    Row("train-lr-inf", (*TRAIN, "--learning-rate", "inf"), text, "must be finite and in (0, 10], got inf"),
    Row("train-lr-negative", (*TRAIN, "--learning-rate", "-0.1"), text, "got -0.1"),
    Row("train-min-lr-ratio-2", (*TRAIN, "--min-lr-ratio", "2"), text, "--min-lr-ratio must be in [0, 1], got 2.0"),
    Row(
        "train-min-lr-ratio-nan",
        (*TRAIN, "--min-lr-ratio", "nan"),
        text,
        "--min-lr-ratio must be finite and in [0, 1], got nan",
    ),
    Row("train-warmup-negative", (*TRAIN, "--warmup", "-1"), text, "--warmup must be an integer from 0"),
    Row("train-warmup-steps", (*TRAIN, "--warmup", "1"), text, "--warmup (1) must be smaller than --steps (1)"),
    Row(
        "train-weight-decay-inf",
        (*TRAIN, "--weight-decay", "inf"),
        text,
        "--weight-decay must be finite and in [0, 10]",
    ),
    Row("train-grad-clip-0", (*TRAIN, "--grad-clip", "0"), text, "--grad-clip must be in (0, 1e+06], got 0.0"),
    Row("train-seed-negative", (*TRAIN, "--seed", "-1"), text, f"--seed {SEED} -1"),
    Row("train-seed-2-64", (*TRAIN, "--seed", str(2**64)), text, f"--seed {SEED} {2**64}"),
    Row("train-checkpoint-every-0", (*TRAIN, "--checkpoint-every", "0"), text, f"--checkpoint-every {COUNT} 0"),
    Row("train-eval-every-negative", (*TRAIN, "--eval-every", "-10"), text, f"--eval-every {COUNT} -10"),
    Row(
        "train-beyond-memory",
        (*TRAIN, "--layers", "1024", "--model-dim", "65536", "--head-dim", "128"),
        text,
        "to train, more than this machine's",
    ),
    # export-coreml, export-coreai, verify-coreml, verify-coreai
    Row("export-coreml-context-0", (*EXPORT_ML, "--context", "0"), nothing, "--context must be an integer from 1"),
    Row("export-coreml-context-beyond", (*EXPORT_ML, "--context", "300"), nothing, "--context 300 is outside 1..256"),
    Row("export-coreml-context-3", (*EXPORT_ML, "--context", "3"), nothing, "swift-transformers needs at least 4"),
    Row("export-coreml-block-0", (*EXPORT_ML, "--block-size", "0"), nothing, "--block-size must be an integer from 1"),
    Row("export-coreai-context-negative", (*EXPORT_AI, "--context", "-5"), nothing, "got -5"),
    Row("export-coreai-block-huge", (*EXPORT_AI, "--block-size", "100000"), nothing, "65,536, got 100000"),
    Row("verify-coreml-steps-negative", (*VERIFY_ML, "--steps", "-1"), nothing, "--steps must be an integer from 0"),
    Row("verify-coreai-steps-huge", (*VERIFY_AI, "--steps", "9999999"), nothing, "1,048,576, got 9999999"),
    # bench
    Row("bench-p-0", (*BENCH, "-p", "0"), nothing, "--prompt-tokens must be an integer from 1 to 1,048,576, got 0"),
    Row("bench-g-negative", (*BENCH, "-g", "-2"), nothing, "--generation-tokens must be an integer from 1"),
    Row("bench-p-huge", (*BENCH, "-p", str(2**40)), nothing, f"got {2**40}"),
    Row("bench-beyond-context", (*BENCH, "-p", "250", "-g", "10"), nothing, "-p 250 + -g 10 exceeds the model's"),
    Row("bench-trials-0", (*BENCH, "--trials", "0"), nothing, "--trials must be an integer from 1 to 10,000"),
    Row("bench-warmup-negative", (*BENCH, "--warmup", "-1"), nothing, "--warmup must be an integer from 0"),
    Row("bench-seed-negative", (*BENCH, "--seed", "-7"), nothing, f"--seed {SEED} -7"),
    Row("bench-seed-2-64", (*BENCH, "--seed", str(2**64)), nothing, f"{SEED} {2**64}"),
    Row("bench-precision-unknown", (*BENCH, "--precisions", "fp8"), nothing, "unknown precision in fp8"),
    Row(
        "bench-prompt-lookup-0", (*BENCH, "--prompt-lookup", "0"), nothing, "--prompt-lookup must be an integer from 1"
    ),
    Row("bench-num-draft-huge", (*BENCH, "--num-draft", "65"), nothing, "--num-draft must be an integer from 1 to 64"),
    Row(
        "bench-speculation-g-1",
        (*BENCH, "--prompt-lookup", "2", "-g", "1"),
        nothing,
        "--generation-tokens must be an integer from 2 to 1,048,576 with speculation",
    ),
    # no --model (the demo model): the option's error alone, no notice before it
    Row(
        "generate-demo-temp",
        ("generate", "-p", "hi", "--temp", "-1"),
        nothing,
        "--temp must be >= 0 (0 is greedy), got -1.0",
    ),
    Row("chat-demo-top-p", ("chat", "--top-p", "2"), nothing, "--top-p must be in [0, 1], got 2.0"),
    # generate (today's checks)
    Row("generate-top-k-negative", (*GENERATE, "--top-k", "-1"), nothing, "--top-k must be >= 0"),
    Row("generate-min-p-negative", (*GENERATE, "--min-p", "-0.1"), nothing, "--min-p must be in [0, 1]"),
    # --json: an error stays the one line on stderr and the exit status
    Row("generate-json-temp", (*GENERATE, "--json", "--temp", "-1"), nothing, "--temp must be"),
    Row(
        "verify-coreai-json-no-bundle",
        ("verify-coreai", "{out}", "--model", "{model}", "--json"),
        nothing,
        "not a Core AI bundle",
    ),
    Row(
        "eval-ppl-json-no-text",
        ("eval", "ppl", "--model", "{model}", "--text", "{out}", "--json"),
        nothing,
        "no text file",
    ),
)

USAGE = category(
    "usage",
    Row("convert-no-output", ("convert", "{model}"), nothing, "the following arguments are required: -o/--output"),
    Row("convert-bits-3", ("convert", "{model}", "-o", "{out}", "--bits", "3"), nothing, "argument --bits: invalid"),
    Row(
        "convert-group-size-48",
        ("convert", "{model}", "-o", "{out}", "--bits", "4", "--group-size", "48"),
        nothing,
        "argument --group-size: invalid choice: 48 (choose from 32, 64, 128)",
    ),
    Row("convert-unknown-option", ("convert", "{model}", "-o", "{out}", "--fast"), nothing, "unrecognized arguments"),
    Row(
        "export-coreai-no-prefill-option",
        (*EXPORT_AI, "--prefill-length", "8"),
        nothing,
        "unrecognized arguments: --prefill-length",
    ),
    Row("eval-no-metric", ("eval",), nothing, "the following arguments are required: METRIC"),
    Row("eval-unknown-metric", ("eval", "bleu"), nothing, "argument METRIC: invalid choice: 'bleu'"),
    Row("eval-unknown-option", (*EVAL, "--fast"), nothing, "unrecognized arguments: --fast"),
    Row("eval-context-fraction", (*EVAL, "--context", "1.5"), nothing, "argument --context: invalid int value"),
    Row("eval-dtype", (*EVAL, "--dtype", "float8"), nothing, "argument --dtype: invalid choice: 'float8'"),
    Row("train-no-text", ("train", "{out}"), nothing, "the following arguments are required: --text"),
    Row("train-lr-word", (*TRAIN, "--learning-rate", "fast"), nothing, "argument --learning-rate: invalid float"),
    Row("train-seed-nan", (*TRAIN, "--seed", "nan"), nothing, "argument --seed: invalid int value: 'nan'"),
    Row("bench-backend", (*BENCH, "--backend", "tpu"), nothing, "argument --backend: invalid choice: 'tpu'"),
    Row("bench-p-fraction", (*BENCH, "-p", "1.5"), nothing, "argument -p/--prompt-tokens: invalid int value"),
    Row("export-coreml-compress", (*EXPORT_ML, "--compress", "int2"), nothing, "argument --compress: invalid"),
    # Core ML's runner sends a whole prompt in one call: inputIds is ranged 1..context, no prefill length
    Row("export-coreml-prefill", (*EXPORT_ML, "--prefill-length", "8"), nothing, "unrecognized arguments"),
    Row(
        "export-coreai-precision",
        (*EXPORT_AI, "--compute-precision", "bfloat16"),
        nothing,
        "argument --compute-precision: invalid choice",
    ),
    Row("verify-coreml-no-model", ("verify-coreml", "{out}.mlpackage"), nothing, "arguments are required: --model"),
    Row("verify-coreai-unknown-option", (*VERIFY_AI, "--fast"), nothing, "unrecognized arguments: --fast"),
    Row("generate-unknown-option", (*GENERATE, "--fast"), nothing, "unrecognized arguments: --fast"),
    Row("chat-max-tokens-word", ("chat", "--max-tokens", "many"), nothing, "argument --max-tokens: invalid int"),
    # openelm models takes no arguments; --json leaves the usage errors as they are
    Row("models-argument", ("models", "7B"), nothing, "unrecognized arguments: 7B"),
    Row("models-unknown-option", ("models", "--all"), nothing, "unrecognized arguments: --all"),
    Row("generate-json-unknown-option", (*GENERATE, "--json", "--fast"), nothing, "unrecognized arguments: --fast"),
    Row("chat-json", ("chat", "--json"), nothing, "unrecognized arguments: --json"),
    exit=2,
)

LONG = too_long("x")
OUTPUTS = category(
    "output",
    Row("convert-file-there", ("convert", "{model}", "-o", "{out}"), root_file("out"), "already exists"),
    Row("convert-empty-folder-there", ("convert", "{model}", "-o", "{out}"), root_folder("out"), "--force"),
    Row("convert-dangling-link-there", ("convert", "{model}", "-o", "{out}"), root_link("out", "gone"), "exists"),
    Row("convert-into-cwd", ("convert", "{model}", "-o", ".", "--force"), nothing, ". is or holds"),
    Row("convert-into-source", ("convert", "{model}", "-o", "{model}", "--force"), nothing, "which this run reads"),
    Row("convert-into-parent", ("convert", "{model}", "-o", "{root}", "--force"), nothing, "which this run reads"),
    Row("convert-parent-is-file", ("convert", "{model}", "-o", "f/out"), root_file("f"), "f is not a folder"),
    Row("convert-name-too-long", ("convert", "{model}", "-o", LONG), nothing, "its name is 250 bytes, too long"),
    Row("convert-symlink-loop", ("convert", "{model}", "-o", "loop/out"), root_link("loop", "loop"), "symlink loop"),
    Row("export-wrong-suffix", ("export-coreml", "{model}", "-o", "{out}.zip"), nothing, "must end in .mlpackage"),
    Row("export-tokenizer-there", EXPORT_ML, root_folder("out.tokenizer"), "out.tokenizer already exists"),
    Row("export-coreai-bundle-there", EXPORT_AI, root_folder("out"), "--force"),
    Row("export-coreai-model-file-name", ("export-coreai", "{model}", "-o", "{out}.aimodel"), nothing, "bundle folder"),
    Row("train-text-inside-force", ("train", "r", "--text", "r/t.txt", "--force"), root_file("r/t.txt"), "r/t.txt"),
    Row("train-into-cwd-force", ("train", ".", "--text", "text.txt", "--force"), text, ". is or holds"),
    Row("train-not-empty", TRAIN, both(text, root_file("out/keep.txt")), "out is not empty: pass --resume"),
    Row("train-over-a-file", TRAIN, both(text, root_file("out")), "is a file, not a run folder"),
    Row("train-resume-nothing", (*TRAIN, "--resume"), text, "--resume: no train_state.json"),
    Row("bench-out-file", (*BENCH, "--out", "f"), root_file("f"), "cannot write f/results.json: f is not a folder"),
    Row(
        "bench-out-holds-results",
        BENCH,
        root_file("out/results.json"),
        "results.json already exists: choose another output or pass --force",
    ),
    Row("bench-out-parent-file", (*BENCH, "--out", "f/b"), root_file("f"), "f is not a folder"),
    Row("bench-out-name-too-long", (*BENCH, "--out", "x" * 256), nothing, "File name too long"),
)

BAD_UTF8 = b"In the beginning \xff\xfe was the word\n"
TEXTS = category(
    "text",
    Row("eval-not-utf8", (*EVAL, "--text", "t.txt"), root_file("t.txt", BAD_UTF8), "t.txt is not UTF-8 text"),
    Row("eval-latin1", (*EVAL, "--text", "t.txt"), root_file("t.txt", "café\n".encode("latin-1")), "byte 0xe9"),
    Row("eval-missing", (*EVAL, "--text", "t.txt"), nothing, "no text file at t.txt"),
    Row("eval-folder", (*EVAL, "--text", "{model}"), nothing, "no text file at"),
    Row("eval-empty", (*EVAL, "--text", "t.txt"), root_file("t.txt", b"\n\n"), "the text holds no tokens"),
    Row("train-not-utf8", (*TRAIN, "--text", "t.txt"), root_file("t.txt", BAD_UTF8), "byte 0xff at offset 17"),
    Row(
        "train-val-not-utf8",
        (*TRAIN, "--val-text", "v.txt"),
        both(text, root_file("v.txt", BAD_UTF8)),
        "v.txt is not UTF-8",
    ),
    Row("train-missing", (*TRAIN, "--text", "t.txt"), nothing, "no text file at t.txt"),
    Row(
        "train-too-small-for-vocab",
        (*TRAIN, "--text", "t.txt"),
        root_file("t.txt", b"tiny\n"),
        "cannot train the tokenizer on t.txt",
    ),
)

EXTRAS = category(
    "extra",
    Row("export-coreml", EXPORT_ML, missing_module("coremltools"), "pip install 'openelm-mlx[coreml]'", env=SHADOW),
    Row(  # a package whose files pass their checks: coremltools is imported only then
        "verify-coreml",
        ("verify-coreml", "{model}/p.mlpackage", "--model", "{model}/ckpt"),
        missing_module("coremltools"),
        "coremltools is not installed",
        env=SHADOW,
        base="packages",
    ),
    Row("export-coreai", EXPORT_AI, missing_module("coreai"), "pip install 'openelm-mlx[coreai]'", env=SHADOW),
    Row("verify-coreai", VERIFY_AI, missing_module("coreai"), "coreai.runtime is not installed", env=SHADOW),
)

NONFINITE = category(
    "nonfinite",
    Row("eval-float16", (*EVAL, "--dtype", "float16"), nothing, "not finite (inf or NaN) in float16"),
    Row("bench-fp16", (*BENCH, "--precisions", "fp16"), nothing, "use --precisions fp32 (or bf16)"),
    base="massive",
)

OPTION_ROWS = VALUES + USAGE + OUTPUTS + TEXTS + EXTRAS + NONFINITE
