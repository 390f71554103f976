"""SimpleTuner 4.10.1's own code as a judge of config.json and dataset entries (shared by the oracle tests).

What the trainer runs before it loads a model, in its order: config.json through `json_file.normalize_args`
and `cmd_args.parse_cmdline_args`; each dataset entry through the steps `FactoryRegistry` applies to its
dataset type. Configs are judged as on the machine they were written for: parsing sees a CUDA device
(`--ramtorch` and fp8 need one), and video model families' `framerate` (set by the model before datasets
load) falls back to SimpleTuner's 30 when config.json leaves it unset.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from types import SimpleNamespace

# Datasets `_configure_single_data_backend` runs `_handle_resolution_conversion` on (not audio, not caption).
CONVERTED_TYPES = {"image", "video", "conditioning", "eval"}
# Datasets whose config object the trainer validates (configure_*_backends, _build_caption_backend).
VALIDATED_TYPES = {"text_embeds", "image_embeds", "conditioning_image_embeds", "distillation_cache", "caption"}
# Not the (local) main process: the storage builders then leave cache folders alone.
JUDGE_ACCELERATOR = SimpleNamespace(is_local_main_process=False, is_main_process=False, num_processes=1, device="cpu")


@contextlib.contextmanager
def _quiet():
    """SimpleTuner logs a traceback for every refusal; the message it raises is what the judge keeps."""
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as stderr, contextlib.redirect_stdout(io.StringIO()):
            yield stderr
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _cuda_present():
    """torch.cuda.is_available() is True inside; the float32 precision settings SimpleTuner then changes
    (its TF32 set-up) are restored after, so later tests in the process compute as before."""
    import torch

    backends = torch.backends
    # Setting allow_tf32 also sets fp32_precision: restore one switch per backend, the newer where it exists.
    switches = [
        (owner, "fp32_precision" if hasattr(owner, "fp32_precision") else "allow_tf32")
        for owner in (backends, backends.cuda.matmul, backends.cudnn, backends.cudnn.conv, backends.cudnn.rnn)
        if hasattr(owner, "fp32_precision") or hasattr(owner, "allow_tf32")
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in switches]
    matmul_precision = torch.get_float32_matmul_precision()
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = original
        torch.set_float32_matmul_precision(matmul_precision)
        for owner, name, value in saved:
            setattr(owner, name, value)


def simpletuner_parses(config: dict):
    """(args, None) when SimpleTuner's mapping and parser accept config.json in the current folder, else
    (None, its message)."""
    from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
    from simpletuner.helpers.configuration.json_file import normalize_args

    with _quiet() as stderr, _cuda_present():
        try:
            args = parse_cmdline_args(input_args=normalize_args(config), exit_on_error=True)
            if args.framerate is None:
                args.framerate = 30
            return args, None
        except SystemExit:
            return None, (stderr.getvalue().strip().splitlines() or ["exit"])[-1]
        except Exception as error:  # ValueError mostly; some rules crash with TypeError or AssertionError
            lines = str(error).strip().splitlines() or [type(error).__name__]
            return None, f"{type(error).__name__}: {lines[-1]}"


def simpletuner_entry_refusal(entry: dict, args) -> str | None:
    """SimpleTuner's message when the trainer's per-entry steps refuse this dataset entry, else None."""
    from simpletuner.helpers.data_backend.config import create_backend_config
    from simpletuner.helpers.data_backend.factory import FactoryRegistry, init_backend_config

    entry = copy.deepcopy(entry)
    with _quiet():
        try:
            if entry.get("dataset_type") == "conditioning" or entry.get("conditioning_type") is not None:
                entry["dataset_type"] = "conditioning"
            kind = str(entry.get("dataset_type", "image"))
            if kind in CONVERTED_TYPES:
                FactoryRegistry._handle_resolution_conversion(SimpleNamespace(args=args), entry)
            config = create_backend_config(copy.deepcopy(entry), vars(args))
            if kind in VALIDATED_TYPES or entry.get("data_generator") is not None:
                config.validate(vars(args))
            init_backend = init_backend_config(copy.deepcopy(entry), args, JUDGE_ACCELERATOR)
            if kind in CONVERTED_TYPES and entry.get("type", "local") == "local":
                FactoryRegistry._configure_backend_by_type(
                    SimpleNamespace(args=args, accelerator=JUDGE_ACCELERATOR), copy.deepcopy(entry), init_backend
                )
        except Exception as error:
            lines = str(error).strip().splitlines() or [type(error).__name__]
            return f"{type(error).__name__}: {lines[-1]}"
    return None
