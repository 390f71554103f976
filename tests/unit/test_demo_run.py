"""lcm_plugin.demo.run: progress read from SimpleTuner's metrics log; the fresh output folder."""

from __future__ import annotations

import json

from lcm_plugin.demo import run


def test_progress_reads_the_last_lcm_step_and_skips_a_partial_line(tmp_path):
    metrics = tmp_path / "training_metrics.jsonl"
    assert run._progress(metrics) == (0, None)
    lines = [
        {"step": 1, "metrics": {"lcm_loss": 0.5}},
        {"step": 1, "metrics": {"system/cpu_percent": 100.0}},
        {"step": 2, "metrics": {"lcm_loss": 0.25}},
    ]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 3, "metr')
    assert run._progress(metrics) == (2, 0.25)


def test_prepare_regenerates_only_the_demo_outputs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aspect_ratio_bucket_indices_shapes.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("user file")
    run.prepare(tmp_path, run.DEFAULT_TRAINING)
    assert not (tmp_path / "data" / "aspect_ratio_bucket_indices_shapes.json").exists()
    assert len(list((tmp_path / "data").glob("*.png"))) == run.DATASET_SIZE
    assert (tmp_path / "config" / "config.json").is_file() and (tmp_path / "keep.txt").is_file()
