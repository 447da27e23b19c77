"""Research recipes, not the library: training the demo model, its MHA/GQA twins, and the int8-cache study.

Each is a script (`python -m mla_edge.models.recipes.<name> --help`) that needs torch and takes its data paths as
arguments.
"""
