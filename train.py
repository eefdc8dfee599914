"""Train any task from an ml-collections config.

    python train.py --config configs/vqgan.py:shapes --workdir runs/vqgan_shapes [--config.optim.lr=3e-4]

Re-running the same command resumes from the workdir's latest checkpoint.
"""

from jaxunified.cli import main_train

if __name__ == "__main__":
    main_train()
