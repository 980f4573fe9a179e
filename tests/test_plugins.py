"""Methods, backends and rewards by entry point: a package of the user's adds its own the way rtdmd-bench does."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest
import torch

from rtdmd import registry
from rtdmd.errors import UserError
from rtdmd.rewards import registry as rewards

PLUGIN = '''
from dataclasses import dataclass

import torch

from rtdmd.registry import register_method
from rtdmd.rewards.registry import no_options, register_reward_factory


@dataclass
class PluginOptions:
    scale: float = 1.0


@register_method("plugin-method", PluginOptions, backends=("toy2d",), default_backend="toy2d", help="a user's method")
def make_plugin_method(cfg, backend):
    return ("plugin", cfg, backend)


class Brightness:
    name, differentiable, identity = "brightness", True, "plugin:brightness"

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@register_reward_factory("brightness", differentiable=True)
def brightness(backend_name, backend, device, differentiable, **options):
    no_options("brightness", options, "")
    return Brightness()


def not_registered(cfg, backend):
    return None
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """A user package `my_plugin` with entry points in the three groups (and two broken ones)."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    (tmp_path / "my_broken_plugin.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {
        registry.METHOD_GROUP: {"plugin-method": "my_plugin:make_plugin_method", "silent": "my_plugin:not_registered",
                                "needs-extra": "my_broken_plugin:factory", "unwritten": "my_plugin_absent:factory"},
        rewards.REWARD_GROUP: {"brightness": "my_plugin:brightness"},
    }
    real = registry.entry_points

    def entry_points(group):
        found = dict(real(group))
        found.update({n: EntryPoint(n, v, group) for n, v in table.get(group, {}).items()})
        return found

    monkeypatch.setattr(registry, "entry_points", entry_points)
    yield
    for name in ("plugin-method", "silent"):
        registry._METHODS.pop(name, None)
    rewards._FACTORIES.pop("brightness", None)
    for mod in ("my_plugin", "my_broken_plugin"):
        sys.modules.pop(mod, None)


def test_a_plugin_method_loads_by_name(plugin):
    entry = registry.get_method("plugin-method")
    assert entry.help == "a user's method" and entry.backends == ("toy2d",)
    assert entry.factory("cfg", "backend") == ("plugin", "cfg", "backend")


def test_entry_point_errors_are_user_errors(plugin):
    with pytest.raises(UserError, match="unknown method 'nope'; choose one of: .*plugin-method"):
        registry.get_method("nope")
    with pytest.raises(UserError, match="does not register it; decorate its factory"):
        registry.get_method("silent")
    with pytest.raises(UserError, match="needs the package 'a_package_that_is_not_installed'"):
        registry.get_method("needs-extra")
    with pytest.raises(UserError, match="'unwritten' is not available in this version"):
        registry.get_method("unwritten")
    assert "unwritten" not in registry.available(registry.METHOD_GROUP)


def test_a_plugin_reward_is_listed_and_built(plugin):
    assert "brightness" in rewards.reward_names() and rewards.is_differentiable("brightness")
    r = rewards.training_reward("brightness", backend="shapes", differentiable=True)
    assert r(torch.ones(2, 3, 4, 4), ["a", "b"]).tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="has no option colour"):
        rewards.get_reward("brightness", colour="red")
    with pytest.raises(UserError, match="cannot register reward 'brightness'"):
        rewards.register_reward("brightness", lambda images, prompts: images.sum())


def test_an_uninstalled_tree_says_how_to_install(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: {})
    with pytest.raises(UserError, match="rtdmd-bench is not installed; install it with pip install -e ."):
        registry.get_method("a-method-of-an-uninstalled-tree")
    with pytest.raises(UserError, match="no rewards are registered"):
        rewards.get_reward("a-reward-of-an-uninstalled-tree")
