"""The quality check's SimpleTuner coupling (install.py Q1): the patch and its removal, and that SimpleTuner's own
validation clean-up always runs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from lcm_plugin.simpletuner import install as installer
from lcm_plugin.simpletuner import quality_check_patches


@pytest.fixture
def validation_class():
    installer.install()
    installer.uninstall()
    from simpletuner.helpers.training.validation import Validation

    original = Validation.__dict__["finalize_validation"]
    yield Validation, original
    installer.uninstall()


def test_install_wraps_finalize_validation_and_uninstall_restores_it(validation_class):
    validation, original = validation_class
    installer.install()
    assert validation.__dict__["finalize_validation"] is not original
    assert validation.__dict__["finalize_validation"].__wrapped__ is original
    installer.uninstall()
    assert validation.__dict__["finalize_validation"] is original


def test_clean_up_runs_after_a_failed_check_and_the_failure_is_logged(caplog):
    clean_ups = []
    finalize = quality_check_patches._finalize_with_quality_check(lambda self, kind: clean_ups.append(kind),
                                                                  surfaces={})
    broken = SimpleNamespace(config=SimpleNamespace(distillation_method="lcm"))  # no model: the check raises
    with caplog.at_level(logging.ERROR, logger="simpletuner-lcm"):
        finalize(broken, "intermediary")
    assert clean_ups == ["intermediary"]
    assert "the LCM quality check failed (AttributeError" in caplog.text


def test_no_check_outside_lcm_runs(caplog):
    clean_ups = []
    finalize = quality_check_patches._finalize_with_quality_check(lambda self, kind: clean_ups.append(kind),
                                                                  surfaces={})
    other = SimpleNamespace(config=SimpleNamespace(distillation_method=None), model=SimpleNamespace(pipeline=object()),
                            distiller=None)
    with caplog.at_level(logging.INFO, logger="simpletuner-lcm"):
        finalize(other, "intermediary")
    assert clean_ups == ["intermediary"]
    assert "quality" not in caplog.text.lower()
