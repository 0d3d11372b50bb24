"""``python -m comfyui_xdit_cogvideo generate|pool-status|worker ...`` (see cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m comfyui_xdit_cogvideo"))
