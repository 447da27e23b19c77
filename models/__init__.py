"""Defines: the architecture config, the MLA decoder, RoPE, checkpoint I/O, the demo model, research recipes.

Importing this package is torch-free (the runtime reads DEMO_DIR); `mla`, `rope`, `checkpoint` and `recipes` need torch.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the embedded 5.9M-parameter demo model
