"""Copies the project's shared reference facts (../shared/reference/elm_reference.json, the
paper's configs as names and numbers) into tests/golden/elm_reference/, for test machines that
have no ../shared beside the checkout. tests/training/test_plans.py reads ../shared when it is
there and then checks that this copy still equals it.

Usage: python tools/copy_reference.py
"""

import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "shared", "reference", "elm_reference.json")
TARGET = os.path.join(HERE, "..", "tests", "golden", "elm_reference", "elm_reference.json")

if __name__ == "__main__":
  shutil.copyfile(SOURCE, TARGET)
  print(f"copied {os.path.abspath(SOURCE)} -> {os.path.abspath(TARGET)}")
