"""`simpletuner-lcm cache build`: a run's latents and text embeddings, cached before training (docs/cache-build.md).

`plan` (configs, scan, buckets, batches; no torch), `encode` (VAE and CLIP encoders as SimpleTuner uses them),
`simpletuner_format` (SimpleTuner's own cache and bucket files), `build` (resumable, multi-process orchestration).
"""

from lcm_plugin.cache_build.build import BuildOptions, BuildReport, build
from lcm_plugin.cache_build.plan import BuildError

__all__ = ["BuildError", "BuildOptions", "BuildReport", "build"]
