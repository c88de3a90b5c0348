"""The rule for missing resources in tests/conftest.py: skip on a developer's machine, fail in CI."""

from __future__ import annotations

import shutil
import types

import pytest

from tests import conftest


def _item(*markers: str) -> types.SimpleNamespace:
    """Just enough of a pytest.Item for pytest_runtest_setup: the markers it carries."""
    return types.SimpleNamespace(get_closest_marker=lambda name: object() if name in markers else None)


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else "/usr/bin/" + name)


def test_server_test_skips_without_java_off_ci(no_java: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Java 17"):
        conftest.pytest_runtest_setup(_item("server"))
    monkeypatch.setenv("CI", "false")  # only CI=true counts, as the CI services set it
    with pytest.raises(pytest.skip.Exception):
        conftest.pytest_runtest_setup(_item("server", "slow"))


def test_server_test_fails_without_java_in_ci(no_java: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"Java 17.*CI=true"):
        conftest.pytest_runtest_setup(_item("server"))
    with pytest.raises(pytest.fail.Exception, match="no TorchServe jar"):
        conftest.skip_or_fail("no TorchServe jar")


def test_tests_without_the_server_marker_do_not_need_java(no_java: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    conftest.pytest_runtest_setup(_item("slow"))


def test_java_present_runs_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/opt/jdk/bin/" + name)
    conftest.pytest_runtest_setup(_item("server"))
    assert conftest.require_java() == "/opt/jdk/bin/java"
