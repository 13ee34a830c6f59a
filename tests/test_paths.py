"""Tests for jaxlora.paths: `/`-joined leaf paths of nested parameter dicts."""

from jaxlora.paths import flatten_paths, replace_paths, unflatten_paths


def test_flatten_unflatten_round_trip():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    flat = flatten_paths(tree)
    assert flat == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert unflatten_paths(flat) == tree


def test_replace_paths_replaces_only_the_named_leaves():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "n": None}
    new = replace_paths(tree, {"a/c/d": 20, "e": 30, "n": 4, "a/missing": 5, "a": 6})
    assert new == {"a": {"b": 1, "c": {"d": 20}}, "e": 30, "n": 4}
    assert list(new) == list(tree) and list(new["a"]) == list(tree["a"])  # structure and order
    assert tree == {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "n": None}  # the input is untouched
    assert new["a"] is not tree["a"]  # a copy, not a shared node
    assert replace_paths(tree, {}) == tree
