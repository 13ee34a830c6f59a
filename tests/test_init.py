"""The curated top-level namespace: every listed name resolves, and importing is cheap."""

import importlib
import subprocess
import sys

import pytest

import jaxlora


@pytest.mark.parametrize("name", jaxlora.__all__)
def test_every_public_name_resolves_to_its_module(name):
    obj = getattr(jaxlora, name)
    if name in jaxlora._MODULES:
        assert obj is importlib.import_module(f"jaxlora.{name}")
    else:
        home = importlib.import_module(f"jaxlora.{jaxlora._NAMES[name]}")
        assert obj is getattr(home, name) and name in home.__all__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'lorax'"):
        jaxlora.lorax  # noqa: B018


def test_import_jaxlora_does_not_import_jax():
    code = "import sys, jaxlora, jaxlora.errors; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
