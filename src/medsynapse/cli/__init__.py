"""Command line: `medsynapse demo | train | predict | export | eval | eval-summary | fixtures | convert | pipeline |
study | inspect | ...`."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from medsynapse.cli import data, evaluate, models, settings, train

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*fast processor.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft, not ours


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynapse", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line naming what is wrong")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)  # every command takes --debug (parents=[common])

    train.add_commands(sub, common)
    models.add_commands(sub, common)
    evaluate.add_commands(sub, common)
    data.add_commands(sub, common)
    settings.add_commands(sub, common)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a busy folder, not a bug: shown as one line (the message names the file,
    record and field); anything else keeps its traceback."""
    from medsynapse.config import ConfigError
    from medsynapse.data.schema import DataError
    from medsynapse.locking import FolderInUseError
    from medsynapse.model.processor import ModelNotFoundError

    return (ConfigError, DataError, FolderInUseError, ModelNotFoundError, FileNotFoundError, ValueError,
            NotImplementedError)  # a launch or setting this version refuses, with its reason


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    resolve_config_arguments(args)
    message: str | None
    try:
        return args.func(args)
    except expected_errors() as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"medsynapse {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk, a read-only or forbidden folder: one line naming it, exit code 1
        message = _disk_message(err)
        if message is None or args.debug:
            raise
        print(f"medsynapse {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def resolve_config_arguments(args: argparse.Namespace) -> None:
    """Every command's config file (`--config`, `config show FILE`) found in the current folder or, failing that,
    among the configs shipped in the package (`config.find_config`): an installed wheel runs `medsynapse demo`
    without a checkout."""
    from medsynapse.config import find_config

    for name in ("config", "file"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, str(find_config(value)))


def _disk_message(err: BaseException) -> str | None:
    """The one line for an error that is the disk's or a folder's (locking.OutputNotWritable, or an OSError such as
    ENOSPC / EROFS / EACCES raised where no writer wrapped it: it names the path it carries); None otherwise."""
    from medsynapse.locking import DISK_ERRORS, OutputNotWritable

    if isinstance(err, OutputNotWritable):
        return " ".join(str(err).split())
    if not isinstance(err, OSError) or err.errno not in DISK_ERRORS:
        return None
    where = err.filename if err.filename is not None else "an output folder"
    hint = "; free some space and rerun (training: with --resume)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{where}: {DISK_ERRORS[err.errno]} ({os.strerror(err.errno)}){hint}"


def _end_process_group() -> None:
    """Destroy the torchrun process group once the command is done (recipes keep it for the next pipeline step)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # free the recipes' DDP modules first: one freed after its group is gone can block its rank
        dist.destroy_process_group()

