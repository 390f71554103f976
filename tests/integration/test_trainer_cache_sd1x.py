"""SD 1.x (`model_family: sd1x`) on the data path inside `simpletuner train`: an LCM LoRA run of the tiny SD 1.x
reads latents and text embeddings from the shards (no per-file `.pt`), and the shards' text embeddings equal the
`<md5>-sd1x.pt` files SimpleTuner's own path writes for the same run (SIMPLETUNER_LCM_DATA_PATH=simpletuner)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from conftest import COLOURS, SHAPES, write_lcm_training_dir
from test_simpletuner_train import STEPS, assert_lcm_run, run_stock_trainer

SERVED_LINE = "datasets 'shapes' read latents and text embeddings from the memory-mapped caches"


def sd1x_run(root: Path, model_dir: Path) -> Path:
    run = write_lcm_training_dir(root, model_dir, max_train_steps=STEPS)  # assert_lcm_run checks STEPS steps
    config_file = run / "config" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_family": "sd1x"}, indent=2))
    return run


def test_an_sd1x_run_trains_from_the_shards_with_simpletuners_text_embeddings(tmp_path, tiny_sd1_dir, trainer_env):
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    from lcm_plugin.cache import LatentCacheReader

    ours = sd1x_run(tmp_path / "ours", tiny_sd1_dir)
    log = run_stock_trainer(ours, trainer_env)
    assert_lcm_run(log, ours / "output")
    assert SERVED_LINE in log and "4 image(s) encoded here" in log, log[-4000:]
    assert sorted((ours / "cache").rglob("*.pt")) == [], "the covered dataset went to SimpleTuner's .pt files"

    stock = sd1x_run(tmp_path / "stock", tiny_sd1_dir)
    trainer_env["SIMPLETUNER_LCM_DATA_PATH"] = "simpletuner"
    log = run_stock_trainer(stock, trainer_env)
    assert_lcm_run(log, stock / "output")
    assert "read latents and text embeddings from the memory-mapped caches" not in log, log[-4000:]

    loader = LocalDataBackend(accelerator=None, id="text", compress_cache=True)  # compress_disk_cache default
    shards = LatentCacheReader(ours / "cache" / "text" / "lcm")
    for caption in [""] + [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]:
        md5 = hashlib.md5(caption.encode()).hexdigest()
        theirs = loader.torch_load(str(stock / "cache" / "text" / f"{md5}-sd1x.pt"))
        assert set(theirs) == {"prompt_embeds"}, caption  # SD1x._format_text_embedding: no pooled output
        (key,) = {k for k in shards.keys() if k.startswith(md5 + "@")}
        assert key.endswith("/prompt_embeds"), key
        torch.testing.assert_close(shards.get_torch(key)[None], theirs["prompt_embeds"], atol=1e-5, rtol=1e-5)
    # the latents: SimpleTuner's own .pt for the same images hold latents of the shards' shape and dtype
    stock_latents = sorted((stock / "cache" / "vae").rglob("*.pt"))
    assert len(stock_latents) == len(COLOURS) * len(SHAPES)
    latent_store = LatentCacheReader(ours / "cache" / "vae" / "lcm")
    image_keys = [k for k in latent_store.keys() if "@" in k and "#" not in k and "/" not in k.partition("@")[2]]
    theirs = loader.torch_load(str(stock_latents[0]))
    theirs = theirs["latents"] if isinstance(theirs, dict) else theirs
    assert latent_store.get_torch(image_keys[0]).shape == theirs.shape, (image_keys, theirs.shape)
