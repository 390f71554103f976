"""`simpletuner-lcm cache build`: a run's latents and text embeddings, cached before training (docs/cache-build.md).

The flow, one module a step, data passed forward: `plan` (configs, the folder's inventory through its scan memo,
captions, buckets, batches), `fingerprint` (what each entry is a function of, and its key; model-file digests
remembered by stamp), `store` (opening, repairing, pruning the stores; putting entries), `checks` (the stores against
the plan: what to encode and why), `encode` (VAE and CLIP encoders as SimpleTuner runs them on this host), `fill`
(decoding and encoding what the stores lack), `manifest` (what a build records beside each store, and the completion
record a restart trusts), `layout` (store folders and entry keys), `simpletuner_format` (SimpleTuner's own cache and
bucket files), `ranks` (how processes agree, phase by phase) and `build` (the steps in order, on one process or many).
`lcm_plugin.trainer_cache` serves the result to the trainer.
"""

from lcm_plugin.cache_build.build import BuildOptions, BuildReport, build
from lcm_plugin.cache_build.plan import BuildError

__all__ = ["BuildError", "BuildOptions", "BuildReport", "build"]
