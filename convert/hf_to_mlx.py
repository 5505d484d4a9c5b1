"""`openelm convert`: a Hugging Face (or corenet, or our own) checkpoint -> an MLX folder,
optionally 4/8-bit, with Apple's chat template for Instruct models. Tensor by tensor, written as
it goes (openelm_mlx.model_folder), so memory stays near one tensor."""

from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from openelm_mlx.checkpoint import build_model, quantized_paths, read_header, read_weights, resolve_source, weight_files
from openelm_mlx.config import GROUP_SIZES, OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loader import DTYPES, named_dtype
from openelm_mlx.model_folder import source_name, write_model_folder
from openelm_mlx.options import CONVERT_RULES, DEFAULT_GROUP_SIZE, QUANT_BITS, check_options
from openelm_mlx.outputs import check_output
from openelm_mlx.tokenizer import check_tokenizer_fits, find_tokenizer, is_instruct_model
from openelm_mlx.units import size_text

CHAT_TEMPLATES = ("auto", "instruct", "none")


def storage_dtype(name: str, weights: Dict[str, mx.array], config: OpenELMConfig) -> mx.Dtype:
    """'auto' keeps a 16-bit checkpoint as it is and stores a float32 one in 16 bits
    (bfloat16 for 3B); loading upcasts to float32 where activations need it."""
    dtype = named_dtype(name)
    if dtype is not None:
        return dtype
    source = weights["transformer.token_embeddings.weight"].dtype
    if source in (mx.float16, mx.bfloat16):
        return source
    return mx.bfloat16 if config.wants_bfloat16 else mx.float16


def wants_chat_template(choice: str, source, folder: Path) -> bool:
    """Apple's template for Instruct models: 'auto' asks is_instruct_model (the source folder's
    tokenizer_config.json if it has one, else a release name like apple/OpenELM-270M-Instruct)."""
    return choice == "instruct" or (choice == "auto" and is_instruct_model(source_name(source), folder))


def convert(
    source,
    output,
    dtype: str = "auto",
    bits: Optional[int] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    tokenizer: Optional[str] = None,
    quantize_embedding: bool = True,
    chat_template: str = "auto",
    force: bool = False,
) -> Path:
    """Write an MLX folder (config.json, model.safetensors, tokenizer files) that both
    openelm_mlx.load and mlx_lm.load read. Returns the output folder."""
    check_options({"bits": bits, "group_size": group_size}, CONVERT_RULES)
    if chat_template not in CHAT_TEMPLATES:
        raise OpenELMError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got '{chat_template}'")
    output = Path(output)
    check_output(output, force, reads=[source])  # before a download or a long read

    folder = resolve_source(source)
    config = OpenELMConfig.from_pretrained(folder)
    weights = read_weights(folder)
    if quantized_paths(weights) and bits is not None:
        raise OpenELMError(f"{source} is already quantized: convert from the float checkpoint to change --bits")
    build_model(config, weights)  # checks names and shapes; the weights stay lazy, nothing is read
    instruct = wants_chat_template(chat_template, source, folder)
    tok = find_tokenizer(folder, tokenizer, required=False)
    if tok is not None:
        check_tokenizer_fits(tok, config)

    write_model_folder(
        output,
        config,
        weights,
        storage_dtype(dtype, weights, config),
        source,
        tokenizer=tok,
        instruct=instruct,
        bits=bits,
        group_size=group_size,
        quantize_embedding=quantize_embedding,
        force=force,
        reads=[folder, tok.path if tok else None],
    )
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    notes = [] if tok else ["no tokenizer.model found: pass --tokenizer to include one"]
    if instruct and tok:
        notes.append("Instruct: chat template in tokenizer_config.json")
    print(
        f"wrote {output}: {size_text(size)}, {8 * size / config.num_parameters():.2f} bits per weight"
        + "".join(f" ({note})" for note in notes)
    )
    return output


def add_arguments(parser):
    parser.add_argument("source", help="Hugging Face folder or repo id, corenet MLX export, or MLX folder")
    parser.add_argument("-o", "--output", required=True, help="output folder (must not exist, unless --force)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="float dtype to store (auto: keep 16-bit sources, float32 -> float16, bfloat16 for 3B)",
    )
    parser.add_argument(
        "--bits",
        type=int,
        choices=QUANT_BITS,
        help="quantize weights to 4 or 8 bits (MLX affine, group-wise; default: float weights)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        choices=GROUP_SIZES,
        help="weights per quantization group, with --bits",
    )
    parser.add_argument(
        "--no-quantize-embedding",
        dest="quantize_embedding",
        action="store_false",
        help="keep the tied embedding (and so the output layer) in the float dtype",
    )
    parser.add_argument("--tokenizer", help="tokenizer.model (file, folder or repo id) to copy into the output")
    parser.add_argument(
        "--chat-template",
        default="auto",
        choices=CHAT_TEMPLATES,
        help="Apple's Instruct chat template in tokenizer_config.json (auto: for Instruct sources, "
        "by their tokenizer_config.json or release name)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def main(args):
    try:
        convert(
            args.source,
            args.output,
            dtype=args.dtype,
            bits=args.bits,
            group_size=args.group_size,
            tokenizer=args.tokenizer,
            quantize_embedding=args.quantize_embedding,
            chat_template=args.chat_template,
            force=args.force,
        )
    except RuntimeError:
        # MLX reads the weights lazily, as they are written: a file truncated since its header was
        # checked fails there without its name ("[read] Unable to read from file"); name it.
        for path in weight_files(resolve_source(args.source)):
            read_header(path)
        raise
