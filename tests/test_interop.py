"""Folders of `openelm train` and `openelm convert` in the MLX tools: mlx_lm.load reads the same
token ids and computes the same logits as openelm_mlx.load; a converted Instruct folder answers
through a local mlx_lm.server (queried with the openai client) and mlx-lm's generate command with
Apple's chat template applied, token for token as openelm_mlx's greedy generation of chat_prompt()."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from openelm_mlx import generate, load
from openelm_mlx.apps.train import train
from openelm_mlx.benchmarks.synthetic import TEXT
from openelm_mlx.convert.hf_to_mlx import convert
from openelm_mlx.loader import DEMO_MODEL
from openelm_mlx.tokenizer import chat_prompt

TEXTS = [
    "Once upon a time, café 🙂 and 東京",
    "Line one\nline two\n\n  indented 2024 digits",
    "<|user|>\nName a sea.</s>\n<|assistant|>\n",  # the chat template's text, </s> the eos token
]
MESSAGES = [
    {"role": "system", "content": "Answer as the scripture does."},
    {"role": "user", "content": "Who made the heaven and the earth?"},
]
MAX_TOKENS = 24
SERVER_START_SECONDS = 90  # bounded waits: a cold start loads mlx, transformers and the model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The model/ folder of a tiny `openelm train` run (a few steps: the folder's format is the point)."""
    root = tmp_path_factory.mktemp("train")
    (root / "train.txt").write_text(TEXT * 30)
    settings = dict(layers=2, model_dim=128, head_dim=16, vocab_size=320, context=64, batch_size=4)
    return train(root / "train.txt", root / "run", steps=4, warmup=1, **settings)


def test_train_and_convert_folders_read_the_same_in_both_toolkits(trained, tmp_path):
    converted = convert(trained, tmp_path / "converted")  # the default: float16 weights
    tokenizer_files = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")  # no template: a base model
    files = {"config.json", "generation_config.json", "model.safetensors", *tokenizer_files}
    assert {p.name for p in trained.iterdir()} == {p.name for p in converted.iterdir()} == files
    for name in ("generation_config.json", *tokenizer_files):
        assert (trained / name).read_bytes() == (converted / name).read_bytes(), name
    assert json.loads((trained / "config.json").read_text())["converted_by"]["source"] == "run"
    assert json.loads((converted / "config.json").read_text())["converted_by"]["source"] == "model"

    for folder in (trained, converted):
        theirs, their_tokenizer = mlx_lm.load(str(folder))
        ours, tokenizer = load(folder)  # float32 activations on a CPU
        theirs.set_dtype(mx.float32)
        for text in TEXTS:
            ids = tokenizer.encode(text)
            assert ids[0] == tokenizer.bos_id and their_tokenizer.encode(text) == ids, (folder.name, text)
            tokens = mx.array([ids])
            assert mx.array_equal(theirs(tokens), ours(tokens)), (folder.name, text)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> Path:
    """The demo model (trained, with a LLaMA-style tokenizer) converted as an Instruct model, in
    float32 so that mlx-lm and openelm_mlx compute in the same dtype on a CPU."""
    out = tmp_path_factory.mktemp("instruct") / "OpenELM-demo-Instruct"
    return convert(DEMO_MODEL, out, dtype="float32", chat_template="instruct")


# transformers 5 builds a config from config.json before any tokenizer (AutoTokenizer.from_pretrained,
# which mlx_lm.load calls), and "openelm" is no transformers architecture (Apple's repos name remote
# code for it, which this toolkit never writes): its generic fallback, PreTrainedConfig, logs this
# warning. Without model_type, or with one transformers knows, it is silent; mlx-lm needs "openelm" to
# pick mlx_lm.models.openelm, so the line is transformers' to drop, not the folder's.
TRANSFORMERS_MODEL_TYPE = "You are using a model of type `openelm` to instantiate a model of type ``."


def test_mlx_lm_load_prints_nothing_about_the_folder_but_transformers_model_type_line(instruct):
    load_it = f"import mlx_lm; mlx_lm.load({str(instruct)!r})"
    result = subprocess.run([sys.executable, "-c", load_it], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in said if TRANSFORMERS_MODEL_TYPE not in line] == [], result.stderr


@pytest.fixture(scope="module")
def reference(instruct):
    """openelm_mlx's greedy answer to MESSAGES: (prompt token count, text)."""
    model, tokenizer = load(instruct)
    prompt = chat_prompt(MESSAGES)
    return len(tokenizer.encode(prompt)), generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, temp=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_lm_command(*args) -> list:
    return [sys.executable, "-m", "mlx_lm", *map(str, args)]


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path):
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlx_lm.server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if json.loads(response.read())["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"mlx_lm.server did not answer within {SERVER_START_SECONDS} s:\n{log.read_text()[-3000:]}")


def test_mlx_lm_server_answers_with_the_chat_template(instruct, reference, tmp_path):
    import openai

    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = mlx_lm_command("server", "--model", instruct, "--host", "127.0.0.1", "--port", port)
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, url, log)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model="default_model", messages=MESSAGES, temperature=0.0, max_tokens=MAX_TOKENS
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    prompt_tokens, text = reference
    assert response.usage.prompt_tokens == prompt_tokens  # BOS + Apple's template, as chat_prompt()
    assert response.usage.completion_tokens == MAX_TOKENS and response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == text
    assert len(text.split()) >= 10  # a trained model's words, not an empty or cut answer


def test_mlx_lm_generate_command_applies_the_chat_template(instruct, reference):
    system, user = (m["content"] for m in MESSAGES)
    command = mlx_lm_command(
        "generate", "--model", instruct, "--system-prompt", system, "--prompt", user, "--max-tokens", MAX_TOKENS
    )
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr
    prompt_tokens, text = reference
    # mlx-lm prints ==========, the completion (greedy by default), ==========, "Prompt: N tokens, ..."
    printed = re.fullmatch(r"=+\n(.*)\n=+\nPrompt: (\d+) tokens,.*", result.stdout, re.DOTALL)
    assert printed is not None, result.stdout
    assert printed.group(1) == text and int(printed.group(2)) == prompt_tokens
