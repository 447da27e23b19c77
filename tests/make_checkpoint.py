"""Write a tiny seeded DeepseekV3ForCausalLM checkpoint with transformers' own class.

python tests/make_checkpoint.py OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_model, save_hf  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-deepseek-v3")
    save_hf(hf_model(q_lora_rank=12, yarn=True), out)
    print(out)
