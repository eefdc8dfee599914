"""Evaluate the latest checkpoint of a run; writes ``eval_<split>.json`` and sample PNGs into the workdir.

    python eval.py --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes
"""

from jaxunified.cli import main_eval

if __name__ == "__main__":
    main_eval()
