"""The committed schemas and key catalogue equal a fresh build from the installed SimpleTuner (`schema --check`)."""

import subprocess
import sys


def test_schema_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "lcm_plugin.cli", "schema", "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_schema_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    from lcm_plugin import schema

    stale = tmp_path / "schemas"
    stale.mkdir()
    monkeypatch.setattr(schema, "SCHEMA_DIR", stale)
    monkeypatch.setattr(schema, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(schema, "CATALOGUE_PATH", tmp_path / "simpletuner_keys.json")
    (stale / "lcm_config.schema.json").write_text("{}\n")
    assert sorted(schema.check()) == [
        "schemas/config.schema.json",
        "schemas/lcm_config.schema.json",
        "schemas/multidatabackend.schema.json",
        "simpletuner_keys.json",
    ]
