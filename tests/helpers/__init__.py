"""Helpers shared by the tests: `from tests.helpers.trees import assert_trees_equal`, ..."""
