"""`simpletuner-lcm cache build`: a run's latents and text embeddings, cached before training (docs/cache-build.md).

The flow, one module a step: `plan` (configs, the folder's inventory through its scan memo, captions, buckets,
batches), `fingerprint` (what each entry is a function of; model-file digests remembered by stamp), `encode` (VAE and
CLIP encoders as SimpleTuner runs them on this host), `layout` (store folders, manifest and entry keys),
`simpletuner_format` (SimpleTuner's own cache and bucket files), `ranks` (how processes agree, phase by phase) and
`build` (the resumable, multi-process build over all of them). `lcm_plugin.trainer_cache` serves the result to the
trainer.
"""

from lcm_plugin.cache_build.build import BuildOptions, BuildReport, build
from lcm_plugin.cache_build.plan import BuildError

__all__ = ["BuildError", "BuildOptions", "BuildReport", "build"]
