"""slimkit.registry.Registry: lazy loading is safe when threads read a registry for the first time together."""

import sys
import threading

import pytest

from slimkit.exceptions import UnknownNameError
from slimkit.registry import Registry


def test_threads_reading_a_lazy_registry_first_all_see_its_entries(tmp_path, monkeypatch):
    # the registering module takes a while to import, as slimkit's model and stage modules do
    (tmp_path / "slow_entries.py").write_text(
        "import time\nfrom test_registry_target import TARGET\ntime.sleep(0.3)\nTARGET.register('only', 1)\n")
    (tmp_path / "test_registry_target.py").write_text(
        "from slimkit.registry import Registry\nTARGET = Registry('thing', lazy_modules=('slow_entries',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from test_registry_target import TARGET

    found, errors = [], []

    def read():
        try:
            found.append(TARGET.get("only"))
        except UnknownNameError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and found == [1, 1, 1, 1]
    for name in ("slow_entries", "test_registry_target"):
        sys.modules.pop(name, None)


def test_a_lazy_module_that_fails_to_import_fails_every_read(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_entries.py").write_text("raise RuntimeError('broken on purpose')\n")
    things = Registry("thing", lazy_modules=("broken_entries",))
    for _ in range(2):  # not "loaded" and silently empty after the first failure
        with pytest.raises(RuntimeError, match="broken on purpose"):
            things.names()
    sys.modules.pop("broken_entries", None)


def test_a_name_registers_once_unless_replaced_on_purpose():
    from slimkit.exceptions import ConfigError

    things = Registry("thing")
    things.register("a", 1)
    with pytest.raises(ConfigError, match="'a' is registered twice"):
        things.register("a", 2)
    things.register("A", 3, replace=True)
    assert things.get("a") == 3 and things.names() == ["a"]


def test_temporarily_registers_for_the_block_and_restores_what_was_there():
    things = Registry("thing")
    things.register("a", 1)
    with things.temporarily("a", 2), things.temporarily("b", 3):
        assert things.get("a") == 2 and things.get("b") == 3
    assert things.get("a") == 1 and "b" not in things
    with pytest.raises(RuntimeError), things.temporarily("c", 4):
        raise RuntimeError("the block fails")
    assert "c" not in things
    things.remove("a")
    assert things.names() == []
