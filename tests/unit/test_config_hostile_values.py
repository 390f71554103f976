"""Any JSON value in any place gives problems, one line each, never an exception (seeded random configs)."""

import random

from lcm_plugin.config.catalogue import load_catalogue
from lcm_plugin.config.databackend import check_backends
from lcm_plugin.config.run import inherited_settings
from lcm_plugin.config.training import check_training_config

VALUES = [None, True, False, 0, 1, -1, 1.5, 1e30, 10**40, float("nan"), "", " ", "true", "FALSE", "1024", "nan",
          "{env:HOME}", "{env:SIMPLETUNER_LCM_UNSET}", "config/examples/x", "[1,2]", "{bad", [], [1, 2], [None], [{}],
          {}, {"a": [1]}, 1024, 5000, "pixel_area", "area", "video", {"min_frames": 3}, {"num_frames": "x"}]
CONFIG_KEYS = ["model_family", "resolution_type", "resolution", "maximum_image_size", "target_downsample_size",
               "distillation_method", "distillation_config", "validation_guidance_skip_layers", "webhook_config",
               "lora_type", "lycoris_config", "framerate", "report_to", "", "--", "lora", "save_total_limit"]
ENTRY_KEYS = ["id", "type", "dataset_type", "resolution", "resolution_type", "maximum_image_size",
              "target_downsample_size", "minimum_image_size", "video", "cache_dir_vae", "disabled", "crop_aspect",
              "crop_aspect_buckets", "caption_strategy", "default", "text_embeds"]


def test_random_values_in_every_place_never_raise():
    rng = random.Random(7)
    options = list(load_catalogue()["keys"])
    for _ in range(1500):
        config = {rng.choice(options + CONFIG_KEYS): rng.choice(VALUES) for _ in range(rng.randint(0, 10))}
        entries = [{rng.choice(ENTRY_KEYS): rng.choice(VALUES) for _ in range(6)} for _ in range(rng.randint(1, 3))]
        problems = check_training_config(config, "config.json")
        problems += check_backends(entries, "multidatabackend.json", inherited_settings(config))
        assert all("\n" not in problem.render() for problem in problems)
