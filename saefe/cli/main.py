"""The ``saefe`` command line: one sub-command per pipeline stage.

Sub-command modules are imported only when chosen, so ``saefe --help`` is instant and a broken
optional part (say, the browser tooling) never takes the others down. Each command's module
provides ``<command>_arguments(parser)`` and ``run_<command>(args) -> int``: parsing and printing
only, the work lives in the stages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> ("module:command", one-line help); the module provides <command>_arguments(parser)
# and run_<command>(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("saefe.cli.build:build", "embed a corpus into an index dir (no args: the offline demo)"),
    "train-sae": ("saefe.cli.sae:train", "train a top-k SAE on an index's embeddings"),
    "import-sae": ("saefe.cli.sae:import", "convert an original SAEFE .pt checkpoint safely"),
    "encode-sae": ("saefe.cli.sae:encode", "store every image's SAE codes as a sparse matrix"),
    "labels": ("saefe.cli.labels:labels", "build label profiles (annotations, folders or text prompts)"),
    "search": ("saefe.cli.search:search", "search the index by label, expression, features, text or image"),
    "inspect": ("saefe.cli.inspect:inspect", "show a feature's top/bottom images, frequency and labels"),
    "saliency": ("saefe.cli.analysis:saliency", "SmoothGrad heat map of a feature or mix on an image"),
    "evaluate": ("saefe.cli.analysis:evaluate", "label AP/mAP of probes and zero-shot; bias of a search"),
    "audit": ("saefe.cli.audit:audit", "a label's top features and how each is tied to a protected attribute"),
    "app": ("saefe.cli.app:app", "serve the Gradio configuration tool (same as python app_gradio.py)"),
    "serve-clip": ("saefe.cli.serve:clip", "serve the encoder over the clip_server protocol"),
    "serve-backend": ("saefe.cli.serve:backend", "serve the index over the meme-search-engine API"),
    "train-demo-model": ("saefe.cli.demo:train_model", "train the demo's tiny SigLIP on the demo world (ships in saefe/demo/model)"),
}


def _quiet_libraries(verbose: bool = False) -> None:
    """transformers' notices and progress bars are noise in normal output; ``-v`` shows them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # transformers not imported by every command
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="saefe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    # Parse only the command name first; then build that command's real parser.
    pre, rest = parser.parse_known_args(argv)
    if not pre.command:
        parser.print_help()
        return 0
    module_name, _, command = COMMANDS[pre.command][0].partition(":")
    module = importlib.import_module(module_name)
    cmd = argparse.ArgumentParser(prog=f"saefe {pre.command}", description=COMMANDS[pre.command][1])
    getattr(module, f"{command}_arguments")(cmd)
    args = cmd.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if pre.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    _quiet_libraries(pre.verbose)
    from saefe.errors import SaefeError

    try:
        return int(getattr(module, f"run_{command}")(args) or 0)
    except SaefeError as e:
        print(f"saefe {pre.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed work is kept and a re-run resumes", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `saefe search --json | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
