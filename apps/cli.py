"""`openelm <subcommand>`: one dispatcher; each subcommand module has add_arguments() and main().

Exit status, the same for every command: 0 done; 1 an error in the input or the environment (one
line `openelm COMMAND: error: ...` on stderr); 2 a usage error (one line, the same form); 130
interrupted (Ctrl-C); 143 terminated (SIGTERM); 141 the reader of stdout went away (`| head`).
"""

import argparse
import importlib
import logging
import os
import signal
import sys
import tempfile

from openelm_mlx import __version__
from openelm_mlx.errors import OpenELMError, Terminated
from openelm_mlx.notices import show_notices
from openelm_mlx.outputs import SIGNALS

# subcommand -> (module, one-line help); modules are imported only when chosen.
SUBCOMMANDS = {
    "generate": ("openelm_mlx.apps.generate", "generate text from a prompt"),
    "chat": ("openelm_mlx.apps.chat", "chat with an Instruct model"),
    "convert": ("openelm_mlx.convert.hf_to_mlx", "convert a Hugging Face checkpoint to MLX (optionally 4/8-bit)"),
    "export-coreml": (
        "openelm_mlx.convert.coreml.export",
        "export a stateful Core ML package for iOS 18/macOS 15 apps",
    ),
    "verify-coreml": ("openelm_mlx.convert.coreml.verify", "check a Core ML package against the MLX model"),
    "export-coreai": (
        "openelm_mlx.convert.coreai.export",
        "export a Core AI LanguageBundle for Apple's LLM runners (OS 27)",
    ),
    "verify-coreai": ("openelm_mlx.convert.coreai.verify", "run a Core AI bundle with Apple's runtime against MLX"),
    "train": ("openelm_mlx.apps.train", "train a small OpenELM on a text corpus"),
    "eval": ("openelm_mlx.apps.eval", "measure perplexity, or accuracy on lm-evaluation-harness tasks"),
    "bench": ("openelm_mlx.benchmarks.bench", "benchmark prompt and generation speed"),
    "models": ("openelm_mlx.apps.models", "list the released OpenELM models and the demo model, and which are cached"),
}
# Optional dependencies -> the extra that installs them.
EXTRAS = {"coremltools": "coreml", "coreai": "coreai", "matplotlib": "bench", "lm_eval": "eval"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the help already says it or there is
    none to show (no value, an empty list, a flag)."""

    def _get_help_string(self, action):
        nothing = action.default in (None, argparse.SUPPRESS) or action.default == []
        if "default" in (action.help or "") or nothing or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the command: usage errors are one line `openelm COMMAND: error: ...` and
    exit 2, also from a nested parser (`openelm eval ppl`); help shows defaults."""

    def __init__(self, *args, command_prog=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.command_prog = command_prog or self.prog

    def error(self, message):
        self.exit(2, f"{self.command_prog}: error: {message} (see {self.prog} --help)\n")


def _on_signal(signum, frame):
    """Ctrl-C and SIGTERM: raised where the program is (Terminated for SIGTERM), so that every
    cleanup written for Ctrl-C runs, and recorded, so that a library's bare `except:` that
    swallows the exception cannot let the run place its outputs (outputs.raise_if_signalled)."""
    SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _standard_streams():
    """A closed stdin or stdout (`<&-`, `>&-`) becomes /dev/null: reads are empty, writes go
    nowhere. Left closed, the first file the run opens would take descriptor 0 or 1, and the
    prompt would be read from (or the output written to) a checkpoint file."""
    for fd, name in ((0, "stdin"), (1, "stdout")):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def _check_environment():
    """What every command needs of its environment, checked before any work. The current folder
    must exist (relative paths mean nothing in a deleted one). MLX's CPU backend compiles its
    kernels in $TMPDIR/mlx/VERSION/cpu (C++'s temp_directory_path): a TMPDIR that is missing, a
    file or read-only would fail the first computation, so a usable one takes its place (the first
    of Python's tempfile candidates: /tmp, /var/tmp, ...), with a warning."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise OpenELMError("the current folder was deleted: cd to a folder that exists and run this again") from None
    wanted = os.environ.get("TMPDIR")
    if wanted is None or (os.path.isdir(wanted) and os.access(wanted, os.W_OK | os.X_OK)):
        return
    del os.environ["TMPDIR"]
    tempfile.tempdir = None
    try:
        usable = tempfile.gettempdir()
    except FileNotFoundError:
        raise OpenELMError(
            f"TMPDIR={wanted!r} is not a writable folder, and neither is /tmp: set TMPDIR to one"
        ) from None
    os.environ["TMPDIR"] = usable
    print(f"openelm: warning: TMPDIR={wanted!r} is not a writable folder: using {usable}", file=sys.stderr)


def _fail(command: str, message: str, code: int):
    print(f"openelm {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    _quiet_stdout()
    sys.exit(code)


def _quiet_stdout():
    """Point stdout at /dev/null, so the interpreter's last flush of a broken or full stdout
    prints nothing more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def build_parser(command=None):
    """(the `openelm` parser, the parser of `command`): only the chosen command's module is
    imported and its options added; without one, the top parser twice."""
    parser = Parser(prog="openelm", description="OpenELM on Apple Silicon with MLX, Core ML and Core AI")
    parser.add_argument("--version", action="version", version=f"openelm-mlx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = parser
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main)
            chosen = sub
            for leaf in leaf_parsers(sub):
                leaf.add_argument(
                    "-q", "--quiet", action="store_true", help="print no notices, only warnings and errors"
                )
    return parser, chosen


def leaf_parsers(parser):
    """The parsers that take a command's options: the parser itself, or each of its own
    subcommands' (`eval ppl`, `eval tasks`), where an option given after the subcommand lands."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [leaf for a in nested for p in a.choices.values() for leaf in leaf_parsers(p)] if nested else [parser]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (`cmd &`)
        signal.signal(signal.SIGINT, _on_signal)
    # coremltools imports transformers, which tells stderr that PyTorch is missing: a line about
    # nothing this toolkit uses, which would break one-line errors (mlx-lm silences it the same way).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _standard_streams()
    try:
        _check_environment()
        parser, chosen = build_parser(command)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, not the top one: `openelm COMMAND: error: ...`
            chosen.error(f"unrecognized arguments: {' '.join(unknown)}")
        show_notices(args.quiet)
        # coremltools warns on import that Core ML's runtime is missing, which on Linux is expected.
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        code = args.run(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handlers below
    except OpenELMError as e:
        _fail(command, e, 1)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        _fail(command, f"this needs {e.name}, which is not installed: pip install 'openelm-mlx[{extra}]'", 1)
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (`openelm generate | head`): stop quietly, as cat does
        sys.exit(141)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        _exit_stopped(143)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        _exit_stopped(130)
    except OSError as e:  # a full disk, a read-only folder, stdout on /dev/full: the system's reason
        where = f": {e.filename}" if e.filename else ""
        _fail(command, f"{e.strerror or e}{where}", 1)
    if code in (130, 143):  # bench: stopped, what it gathered written
        _exit_stopped(code)
    sys.exit(code or 0)


def _exit_stopped(code: int):
    """End a run that Ctrl-C or SIGTERM stopped, now: its cleanup has run (outputs, run folders:
    the context managers unwound on the way here), but a native library may still be computing on
    threads of its own, and the interpreter's exit would wait for it (Apple's runtime on Linux
    finishes its current float16 kernel first: 4-5 s after a stop mid-prefill, measured)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
