"""One rank of tests/integration/test_rank_agreement.py: `python rank_worker.py MODEL_DIR RESULT_JSON`, run in the run
folder with RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT and CONFIG_PATH set.

It does what the trainer does around `configure_multi_databackend` on a CPU: an accelerate process group over gloo,
the plugin's D1 wrapper (`_prepare_data_path`) with the tiny SDXL's VAE and text encoders, then what SimpleTuner's
`configure_multi_databackend` does next: a barrier and an object gather. It writes what this rank serves and what
that gather returned to RESULT_JSON; the plugin's log lines go to stderr.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a collective left unmatched fails here instead of waiting 30 minutes


def main(model_dir: Path, result: Path) -> None:
    faulthandler.dump_traceback_later(170, exit=True)  # a hang shows where it waits
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from lcm_plugin import trainer_cache
    from lcm_plugin.cache_build.encode import load_text_encoders, load_vae
    from lcm_plugin.simpletuner.data_path_patches import _prepare_data_path

    torch.set_num_threads(1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    tokenizers, encoders = load_text_encoders(str(model_dir), "fp32")
    model = SimpleNamespace(vae=load_vae(str(model_dir / "vae"), "fp32"))
    args = SimpleNamespace(model_family="sdxl", distillation_method="lcm")

    time.sleep(float(os.environ.get("RANK_WORKER_DELAY_S", "0")))  # a rank that reaches the data path late
    _prepare_data_path(args, accelerator, encoders, tokenizers, model)

    coverage = trainer_cache.coverage()
    served = {
        "datasets": {dataset_id: sorted(cache.served) for dataset_id, cache in coverage.datasets.items()},
        "texts": sorted(coverage.texts),
    }
    accelerator.wait_for_everyone()
    gathered: list = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, {"rank": accelerator.process_index, "served": served})
    result.write_text(json.dumps({
        "rank": accelerator.process_index, "served": served, "gathered": gathered,
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        # images each dataset's scan read from disk on this rank (the rest came from the scan memo)
        "scan_reads": {dataset_id: cache.listed[2].read for dataset_id, cache in coverage.datasets.items()
                       if cache.listed is not None},
        # whether that inventory is the scan memo itself, mapped (its token), rather than rows of this rank's own
        "memo_mapped": {dataset_id: cache.listed[2].memo_token is not None
                        for dataset_id, cache in coverage.datasets.items() if cache.listed is not None},
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
