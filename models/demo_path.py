"""Where the embedded demo model lives; every command that takes a model falls back to it. Torch-free."""
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def default_model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no MODEL_DIR given and the embedded demo model is missing from {DEMO_DIR}")
    return DEMO_DIR
