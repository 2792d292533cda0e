"""The training engine behind ``train/main.py``: options, checkpoints, the distributed loop."""
