"""Sample text from an IronCore checkpoint or a Hugging Face folder; see `ironcore/inference/cli.py`.

    python tools/generate.py --checkpoint CKPT_DIR --prompt "..." [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
    python tools/generate.py --hf HF_DIR --prompt "..." --prompt "..."
"""

import sys

from ironcore.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
