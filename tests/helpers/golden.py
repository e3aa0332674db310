"""The golden files made by tools/make_t5_goldens.py and tools/make_minilm_golden.py."""

import pathlib

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent.parent / "golden"
GOLDEN_VARIANTS = ("t5_v1_1", "t5_original", "mt5")
