"""What the tools share: one grammar, ``TOOL [CONFIG|RUN] [key=value ...]`` plus a few flags (a run folder's
tools also take ``checkpoint=last|best|PATH``), the config load, the run under signal handling, and one mapping from what went wrong to the exit code and the message on stderr:
0 done, 2 a problem the message explains (config, data, checkpoint, a full disk), 75 preempted with a
checkpoint written (run again with ``resume=auto``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, NoReturn

from .config import config_name, load_config
from .errors import ResdetError
from .dist import barrier, cleanup
from .preemption import PREEMPTED_EXIT_CODE, EvaluationInterrupted, Preempted, catch_stop_signals


def split_checkpoint(args: list[str], default: str = "last") -> tuple[str, list[str]]:
    """``checkpoint=last|best|PATH`` (the tools that read a run folder) apart from the config overrides."""
    checkpoint, overrides = default, []
    for arg in args:
        if arg.startswith("checkpoint="):
            checkpoint = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return checkpoint, overrides


def training_arguments(description: str, config_required: bool, argv=None) -> argparse.Namespace:
    """``CONFIG`` (optional when the schema's defaults are a demo) and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs=None if config_required else "?",
                        help="YAML config" + ("" if config_required else " (default: the embedded demo)"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.batch_size=16")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def run_training(schema: type, train: Callable, args: argparse.Namespace, default_name: str) -> tuple[int, object, dict]:
    """Load the config, train under SIGTERM/SIGUSR1 handling, clean up. Returns (exit code, cfg, summary);
    A :class:`~backbones.engine.errors.ResdetError` (bad config, data, checkpoint, a full disk) is reported as
    ``error: ...`` with exit 2; anything else is a bug and keeps its traceback."""
    cfg, summary = None, {}
    try:
        cfg = load_config(schema, args.config, args.overrides)
        with catch_stop_signals():  # SIGTERM / SIGUSR1: checkpoint at the next step, then exit 75
            summary = train(cfg, config_name(args.config, default_name))
            # every rank done before any tears its process group down: a rank leaving while another still
            # talks to it was seen to abort at exit ("terminate called without an active exception")
            barrier()
    except (Preempted, EvaluationInterrupted) as exc:  # the latter: in the evaluation after the last step
        print(exc, file=sys.stderr)
        return PREEMPTED_EXIT_CODE, cfg, {}
    except ResdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, cfg, {}
    finally:
        cleanup()
    return 0, cfg, summary


def exit_tool(code: int) -> NoReturn:
    """End a tool's process with ``code``. Under torchrun (``WORLD_SIZE`` > 1) the process ends without the
    interpreter's teardown, once its output is flushed and its process group destroyed (the tools call
    :func:`~backbones.engine.dist.cleanup` before they return): gloo's threads torn down at interpreter exit
    were seen to abort a worker now and then ('terminate called without an active exception', SIGABRT) after
    the run had finished and written everything, and torchrun then reports the whole run as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
