"""multidatabackend.json: each entry rule and each cross-entry rule fails with the right JSON pointer."""

import copy
import json
from pathlib import Path

import pytest

from lcm_plugin.config.databackend import check_backends
from lcm_plugin.config.run import inherited_settings

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed"
IMAGES = {"id": "images", "instance_data_dir": "/data", "cache_dir_vae": "cache/vae/images"}
TEXT = {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"}


def _errors(entries, defaults=None):
    problems = check_backends(entries, "m.json", inherited_settings(defaults or {}))
    return [p for p in problems if p.severity == "error"]


def test_seed_backends_have_no_errors():
    entries = json.loads((SEED / "multidatabackend.json").read_text())
    assert check_backends(entries, "m.json", inherited_settings({})) == []


def with_image(**change):
    entry = {**IMAGES, **change}
    return [{k: v for k, v in entry.items() if v is not None}, TEXT]


@pytest.mark.parametrize(
    ("entries", "pointer", "fragment"),
    [
        (with_image(crop_aspect="random"), "/0/crop_aspect", "requires crop_aspect_buckets"),
        (with_image(crop_aspect="closest", crop_aspect_buckets=[]), "/0/crop_aspect", "requires crop_aspect_buckets"),
        (with_image(crop_aspect="sqaure"), "/0/crop_aspect", "did you mean 'square'?"),
        (with_image(crop_style="middle"), "/0/crop_style", "is not one of"),
        (with_image(crop_aspect_buckets=["wide"]), "/0/crop_aspect_buckets/0", ""),
        (with_image(maximum_image_size=2.0), "/0/maximum_image_size", "requires target_downsample_size"),
        (
            with_image(resolution_type="area", maximum_image_size=25, target_downsample_size=1),
            "/0/maximum_image_size",
            "< 20",
        ),
        (
            with_image(resolution_type="pixel", maximum_image_size=2048, target_downsample_size=256),
            "/0/target_downsample_size",
            ">= 512",
        ),
        (
            with_image(resolution_type="pixel_area", maximum_image_size=5000, target_downsample_size=1024),
            "/0/maximum_image_size",
            "5000 px is 25 megapixels; SimpleTuner needs < 20",
        ),
        (
            with_image(resolution_type="pixel_area", resolution=1024.0),
            "/0/resolution",
            "needs an integer pixel edge",
        ),
        (with_image(resolution_type="megapixel"), "/0/resolution_type", "is not one of"),
        (with_image(instance_data_dir=None), "/0", "requires 'instance_data_dir'"),
        (with_image(caption_strategy="parquet"), "/0/caption_strategy", "needs metadata_backend 'parquet'"),
        (with_image(caption_strategy="huggingface"), "/0/caption_strategy", "needs type 'huggingface'"),
        (with_image(disable_vae_cache=True), "/0/disable_vae_cache", "use 'vae_cache_disable'"),
        (with_image(caption_filter_list=["x"]), "/0/caption_filter_list", "only valid for text_embeds"),
        ([IMAGES, {**TEXT, "data_generator": {}}], "/1/data_generator", "only valid for dataset_type 'caption'"),
        (
            with_image(data_generator={"resolutions": ["1024x1024"]}),
            "/0/data_generator",
            "only valid for dataset_type 'caption'",
        ),
        (with_image(train_batch_size=0), "/0/train_batch_size", ""),
        (with_image(train_batch_size=True), "/0/train_batch_size", ""),
        (with_image(caption_file_extensions=[]), "/0/caption_file_extensions", ""),
        (
            with_image(caption_shuffle={"split_on": "tab"}),
            "/0/caption_shuffle/split_on",
            "'comma', 'space' or 'period'",
        ),
        (with_image(start_epoch=1, end_epoch=0), "/0/end_epoch", "must be >= start_epoch"),
        (
            [{**IMAGES, "start_step": 5, "end_step": 2}, {**IMAGES, "id": "b", "cache_dir_vae": "v2"}, TEXT],
            "/0/end_step",
            "must be >= start_step",
        ),
        (with_image(start_epoch=3), "", "available at the start of training"),
        (with_image(id=""), "/0/id", ""),
        (with_image(dataset_type="imgae"), "/0/dataset_type", "did you mean 'image'?"),
        (
            with_image(dataset_type="video", video={"num_frames": 16, "min_frames": 8}),
            "/0/video/min_frames",
            ">= video.num_frames",
        ),
        (with_image(type="csv", caption_strategy="csv"), "/0", "requires 'csv_file'"),
        (
            with_image(type="csv", csv_file="f", csv_cache_dir="c", csv_caption_column="c", csv_url_column="u"),
            "/0/caption_strategy",
            "requires caption_strategy 'csv'",
        ),
        (with_image(type="aws", aws_bucket_name="b"), "/0", "requires 'aws_region_name'"),
        (with_image(type="huggingface", instance_data_dir=None), "/0", "requires 'dataset_name'"),
        (
            with_image(type="huggingface", dataset_name="a/b", metadata_backend="json"),
            "/0/metadata_backend",
            "needs metadata_backend 'huggingface'",
        ),
        (with_image(type="webshart", instance_data_dir=None), "/0", "requires 'source'"),
        (with_image(type="s3"), "/0/type", "is not one of"),
        ([IMAGES, {**TEXT, "type": "csv"}], "/1/type", "cannot use a csv backend"),
        ([IMAGES, {**IMAGES, "cache_dir_vae": "v2"}, TEXT], "/1/id", "already used by entry 0"),
        ([IMAGES, TEXT, {**TEXT, "id": "text2", "cache_dir": "c2"}], "/2/default", "only one text_embeds dataset"),
        ([{**IMAGES, "text_embeds": "txt"}, TEXT], "/0/text_embeds", "did you mean 'text'?"),
        (
            [{**IMAGES, "conditioning_data": "edges"}, TEXT],
            "/0/conditioning_data",
            "no enabled dataset with id 'edges'",
        ),
        ([TEXT], "", "no enabled image, video, audio or caption dataset"),
        ([], "", "no datasets"),
        ([IMAGES, TEXT, "oops"], "/2", "expected an object"),
        (with_image(crop_aspect_buckets=[1.0, {"aspect_bucket": "wide"}]), "/0/crop_aspect_buckets/1", "valid number"),
        ({"id": "x"}, "", "expected a JSON list"),
        ([{**TEXT, "default": "yes"}, IMAGES], "/0/default", ""),
    ],
)
def test_each_rule_fails_with_its_pointer(entries, pointer, fragment):
    problems = _errors(copy.deepcopy(entries))
    assert [p.pointer for p in problems] == [pointer], problems
    assert fragment in problems[0].message


@pytest.mark.parametrize(
    ("entries", "pointer", "fragment"),
    [
        (with_image(instance_data_dirr="/x"), "/0/instance_data_dirr", "did you mean 'instance_data_dir'?"),
        (with_image(default=True), "/0/default", "not read for dataset_type 'image'"),
        (with_image(aws_bucket_name="b"), "/0/aws_bucket_name", "only read when type is 'aws'"),
        # SimpleTuner tests `disabled` by truth value: the string "false" skips the entry.
        (
            [{**IMAGES, "disabled": "false"}, {**IMAGES, "id": "b", "cache_dir_vae": "v2"}, TEXT],
            "/0/disabled",
            "valid boolean",
        ),
        (
            [{**IMAGES, "disabled": True, "crop_aspect": "random"}, {**IMAGES, "id": "b", "cache_dir_vae": "v2"}, TEXT],
            "/0/crop_aspect",
            "requires crop_aspect_buckets",
        ),
        # SimpleTuner 4.10.1's factory never compares latent folders: it trains, with colliding file names.
        ([IMAGES, {**IMAGES, "id": "b"}, TEXT], "/1/cache_dir_vae", "of both 'images' (entry 0) and 'b' (entry 1)"),
        (
            [IMAGES, {**IMAGES, "id": "b", "cache_dir_vae": "./cache/../cache/vae/images/"}, TEXT],
            "/1/cache_dir_vae",
            "one dataset trains on the other's latents",
        ),
        # Nor a latent folder against a text folder: their file names differ.
        ([{**IMAGES, "cache_dir_vae": "cache/text/"}, TEXT], "/0/cache_dir_vae", "also a text_embeds cache_dir"),
    ],
)
def test_what_simpletuner_ignores_is_a_warning(entries, pointer, fragment):
    problems = check_backends(copy.deepcopy(entries), "m.json", inherited_settings({}))
    assert [(p.pointer, p.severity) for p in problems] == [(pointer, "warning")], problems
    assert fragment in problems[0].message


def test_cache_folders_are_compared_where_training_starts(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "cache")
    entries = [{**IMAGES, "cache_dir_vae": "cache/vae"}, {**IMAGES, "id": "b", "cache_dir_vae": "link/vae"}, TEXT]
    problems = check_backends(entries, "m.json", inherited_settings({}), tmp_path)
    assert [(p.pointer, p.severity) for p in problems] == [("/1/cache_dir_vae", "warning")]


def test_cache_build_refuses_a_shared_latent_folder_in_one_line():
    entries = [IMAGES, {**IMAGES, "id": "b", "cache_dir_vae": "./cache/vae/images/"}, TEXT]
    problems = check_backends(entries, "m.json", inherited_settings({}), cache_build=True)
    assert [(p.pointer, p.severity) for p in problems] == [("/1/cache_dir_vae", "error")]
    assert problems[0].render() == (
        "m.json: /1/cache_dir_vae: './cache/vae/images/' is the cache_dir_vae of both 'images' (entry 0) and 'b' "
        "(entry 1): cache build needs one per dataset"
    )


def test_cache_build_refuses_a_latent_folder_that_is_a_text_folder():
    entries = [{**IMAGES, "cache_dir_vae": "./cache/text"}, TEXT]
    problems = check_backends(entries, "m.json", inherited_settings({}), cache_build=True)
    assert [(p.pointer, p.severity) for p in problems] == [("/0/cache_dir_vae", "error")]
    assert problems[0].render() == (
        "m.json: /0/cache_dir_vae: './cache/text' is also a text_embeds cache_dir: cache build needs separate folders"
    )


def test_pixel_area_sizes_inherited_from_config_json_are_not_converted():
    # The trainer converts an entry's own pixel_area sizes, but reads inherited ones as megapixels.
    defaults = {"resolution_type": "pixel_area", "maximum_image_size": 1024, "target_downsample_size": 1024}
    assert _errors([{**IMAGES, "maximum_image_size": 1024, "target_downsample_size": 1024}, TEXT], defaults) == []
    problems = _errors([IMAGES, TEXT], defaults)
    assert [p.pointer for p in problems] == ["/0", "/0"]
    assert "not ones inherited from config.json" in problems[0].message


def test_entries_inherit_size_limits_from_config_json():
    # config.json's maximum_image_size applies to an entry that sets none, as in SimpleTuner.
    (problem,) = _errors([IMAGES, TEXT], defaults={"maximum_image_size": 2048, "resolution_type": "pixel"})
    assert problem.pointer == "/0/maximum_image_size" and "requires target_downsample_size" in problem.message


def test_controlnet_needs_conditioning_on_image_datasets():
    (problem,) = _errors([IMAGES, TEXT], defaults={"controlnet": True})
    assert problem.pointer == "/0" and "ControlNet" in problem.message


def test_disabled_entries_do_not_clash():
    assert _errors([IMAGES, {**IMAGES, "disabled": True}, TEXT]) == []


def test_default_text_embeds_rules_are_warnings_when_simpletuner_recovers():
    problems = check_backends(
        [IMAGES, {**TEXT, "default": False}, {**TEXT, "id": "t2", "default": False}], "m.json", {}
    )
    assert [(p.pointer, p.severity) for p in problems] == [("/1", "warning")]
    problems = check_backends([IMAGES], "m.json", {})
    assert [(p.pointer, p.severity) for p in problems] == [("", "warning")]


def test_schema_key_is_accepted_in_entries():
    assert _errors([{**IMAGES, "$schema": "x"}, TEXT]) == []


def test_an_s3_secret_in_the_file_is_warned_of_simpletuners_debug_log():
    """SimpleTuner's factory logs every entry whole ("Configuring data backend: <id>: {...}"; found in the debug.log
    of tests/integration/test_trainer_data_path_s3.py's runs): a secret in the file ends up there; null and the
    environment do not."""
    aws = {"type": "aws", "aws_bucket_name": "b", "aws_region_name": None, "aws_endpoint_url": None,
           "aws_access_key_id": "AKID", "aws_secret_access_key": "s3cr3t", "aws_session_token": "t0k3n",
           "aws_data_prefix": ""}
    image = {key: value for key, value in IMAGES.items() if key != "instance_data_dir"} | aws
    problems = check_backends([image, TEXT], "m.json", inherited_settings({}))
    assert [(p.pointer, p.severity) for p in problems] == [("/0/aws_secret_access_key", "warning"),
                                                           ("/0/aws_session_token", "warning")], problems
    assert "AWS_SECRET_ACCESS_KEY" in problems[0].message and "s3cr3t" not in problems[0].message
    assert "AWS_SESSION_TOKEN" in problems[1].message
    nulls = image | {"aws_secret_access_key": None, "aws_session_token": None}
    assert check_backends([nulls, TEXT], "m.json", inherited_settings({})) == []
